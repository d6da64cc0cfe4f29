use super::*;

#[test]
fn defaults_match_the_design() {
    let c = Config::default();
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.max_message_bytes, 65536);
    assert_eq!(
        c.echo_max_message_bytes, 65536,
        "/echo has the limits of /ws"
    );
    assert_eq!(c.echo_max_fragments, MAX_FRAGMENTS);
    assert_eq!(c.echo_max_messages_per_second, c.max_messages_per_second);
    assert_eq!(c.max_subscriptions, 128);
    assert_eq!(c.ping_interval, Duration::from_secs(25));
    assert_eq!(c.handshake_timeout, Duration::from_secs(10));
}

#[test]
fn command_line_wins_over_file() {
    let file: Options = toml::from_str("threads = 3\nmax_message_bytes = 1000").unwrap();
    let cli = Options {
        threads: Some(Threads::Count(2)),
        ..Options::default()
    };
    let c = cli.or(file).resolve().unwrap();
    assert_eq!(c.threads, Threads::Count(2));
    assert_eq!(c.max_message_bytes, 1000);
    assert_eq!(
        c.echo_max_message_bytes, 1000,
        "/echo follows /ws unless raised"
    );
}

#[test]
fn redis_comes_from_the_file_and_must_be_a_redis_url() {
    let file: Options = toml::from_str("redis = \"redis://10.0.0.5:6379\"").unwrap();
    let config = file.resolve().unwrap();
    assert_eq!(config.redis.as_deref(), Some("redis://10.0.0.5:6379"));
    assert!(Config::default().redis.is_none());
    let wrong = Options {
        redis: Some("10.0.0.5:6379".into()),
        ..Options::default()
    };
    assert!(wrong.resolve().unwrap_err().contains("redis://"));
    let file: Options =
        toml::from_str("redis = \"redis+cluster://10.0.0.5:7000,10.0.0.6:7001\"").unwrap();
    let config = file.resolve().unwrap();
    assert_eq!(
        config.redis.as_deref(),
        Some("redis+cluster://10.0.0.5:7000,10.0.0.6:7001")
    );
    assert_eq!(config.redis_ack_replicas, 0);
    let file: Options = toml::from_str("redis_ack_replicas = 1").unwrap();
    assert_eq!(file.resolve().unwrap().redis_ack_replicas, 1);
}

#[test]
fn file_accepts_auto_threads_and_rejects_unknown_keys() {
    let auto: Options = toml::from_str("threads = \"auto\"").unwrap();
    assert_eq!(auto.threads, Some(Threads::Auto));
    let err = toml::from_str::<Options>("thread = 2").unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
}

#[test]
fn file_sets_slow_consumer_policies_per_prefix() {
    let file: Options = toml::from_str(
        "slow_consumer_policy = \"drop-oldest\"\n[[namespace]]\nprefix = \"prices.\"\nslow_consumer_policy = \"conflate\"\n",
    )
    .unwrap();
    let c = file.resolve().unwrap();
    assert_eq!(
        c.slow_consumers.policy_for("a"),
        SlowConsumerPolicy::DropOldest
    );
    assert_eq!(
        c.slow_consumers.policy_for("prices.x"),
        SlowConsumerPolicy::Conflate
    );
}

#[test]
fn compression_is_off_by_default_and_set_per_prefix_in_the_file() {
    assert!(!Config::default().compression.negotiates());
    let file: Options = toml::from_str(
        "compression = \"shared\"\n[[namespace]]\nprefix = \"chat.\"\ncompression = \"per-connection\"\n",
    )
    .unwrap();
    let cli = Options {
        compression: Some(CompressionPolicy::Off),
        ..Options::default()
    };
    let c = cli.or(file).resolve().unwrap();
    assert_eq!(c.compression.policy_for("news"), CompressionPolicy::Off);
    assert_eq!(
        c.compression.policy_for("chat.room"),
        CompressionPolicy::PerConnection
    );
    assert!(c.compression.negotiates());
}

#[test]
fn namespaces_come_from_the_file_over_the_flags() {
    let file: Options = toml::from_str(
        "history_size = 7\n\n[[namespace]]\nprefix = \"chat.\"\npresence = true\njoin_leave = true\npublish = \"subscribers\"\n\n[[namespace]]\nprefix = \"feed.\"\nhistory_size = 1000\npublish = \"api\"\npersonal_channels = false\n",
    )
    .unwrap();
    let cli = Options {
        presence: Some(false),
        ..Options::default()
    };
    let c = cli.or(file).resolve().unwrap();
    let chat = c.namespaces.of("chat.room");
    assert!(chat.presence && chat.join_leave);
    assert_eq!(chat.publish, PublishRule::Subscribers);
    assert_eq!(chat.history.size, 7, "unset: the command-line default");
    let feed = c.namespaces.of("feed.x");
    assert_eq!((feed.history.size, feed.publish), (1000, PublishRule::Api));
    assert!(!feed.personal_channels);
    assert!(!c.namespaces.of("news").presence);
}

#[test]
fn an_unknown_namespace_key_names_the_key_and_the_line() {
    let text = "threads = 2\n\n[[namespace]]\nprefix = \"chat.\"\npresense = true\n";
    let err = toml::from_str::<Options>(text).unwrap_err().to_string();
    assert!(err.contains("line 5"), "{err}");
    assert!(err.contains("unknown field `presense`"), "{err}");
    let old = "[[slow_consumer]]\nprefix = \"a.\"\npolicy = \"conflate\"\n";
    let err = toml::from_str::<Options>(old).unwrap_err().to_string();
    assert!(err.contains("unknown field `slow_consumer`"), "{err}");
}

#[test]
fn compression_flag_alone_means_shared() {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        options: Options,
    }
    let alone = Cli::try_parse_from(["herald", "--compression"]).unwrap();
    assert_eq!(alone.options.compression, Some(CompressionPolicy::Shared));
    let named = Cli::try_parse_from(["herald", "--compression", "per-connection"]).unwrap();
    assert_eq!(
        named.options.compression,
        Some(CompressionPolicy::PerConnection)
    );
    assert!(Cli::try_parse_from(["herald", "--compression", "gzip"]).is_err());
}

#[test]
fn tls_needs_both_files() {
    let file: Options = toml::from_str("tls_cert = \"c.pem\"\ntls_key = \"k.pem\"").unwrap();
    let tls = file.resolve().unwrap().tls.unwrap();
    assert_eq!(tls.cert, PathBuf::from("c.pem"));
    assert_eq!(tls.key, PathBuf::from("k.pem"));
    let half: Options = toml::from_str("tls_cert = \"c.pem\"").unwrap();
    assert!(half.resolve().unwrap_err().contains("tls_key"));
}

#[test]
fn rejects_out_of_range_values() {
    assert!("0".parse::<Threads>().is_err());
    let tiny = Options {
        max_message_bytes: Some(10),
        ..Options::default()
    };
    assert!(tiny.resolve().unwrap_err().contains("max_message_bytes"));
    let flood = Options {
        echo_max_messages_per_second: Some(u64::MAX),
        ..Options::default()
    };
    assert!(
        flood
            .resolve()
            .unwrap_err()
            .contains("echo_max_messages_per_second")
    );
}
