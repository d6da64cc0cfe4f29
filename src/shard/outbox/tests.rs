use super::*;

fn written_order(outbox: &Outbox) -> Vec<u8> {
    let mut slices = [IoSlice::new(&[]); 16];
    let n = outbox.io_slices(&mut slices);
    slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
}

#[test]
fn partial_writes_split_frames_in_order() {
    let mut outbox = Outbox::default();
    outbox.push(Bytes::from_static(b"abc"));
    outbox.push(Bytes::from_static(b""));
    outbox.push(Bytes::from_static(b"defg"));
    assert_eq!(outbox.len_bytes(), 7);
    outbox.advance(2);
    assert_eq!(written_order(&outbox), b"cdefg");
    outbox.advance(5);
    assert!(outbox.is_empty());
    assert_eq!(outbox.len_bytes(), 0);
}

#[test]
fn control_frames_overtake_unstarted_data_only() {
    let mut outbox = Outbox::default();
    outbox.push(Bytes::from_static(b"data1"));
    outbox.push(Bytes::from_static(b"data2"));
    outbox.advance(2);
    outbox.push_control(Bytes::from_static(b"PONG"));
    // The started frame finishes first, then the pong, then the rest.
    assert_eq!(written_order(&outbox), b"ta1PONGdata2");
    assert_eq!(outbox.len_bytes(), 8);
    outbox.advance(5);
    assert_eq!(written_order(&outbox), b"NGdata2");
    outbox.advance(2);
    assert_eq!(written_order(&outbox), b"data2");
    outbox.push_control(Bytes::from_static(b"P"));
    assert_eq!(written_order(&outbox), b"Pdata2");
    outbox.advance(6);
    assert!(outbox.is_empty());
}

#[test]
fn taken_chunks_leave_in_write_order_and_free_the_budget() {
    let mut outbox = Outbox::default();
    outbox.push(Bytes::from_static(b"data1"));
    outbox.push_message(Bytes::from_static(b"data2"), 1, 1);
    outbox.push(Bytes::from_static(b"data3"));
    outbox.advance(2);
    outbox.push_control(Bytes::from_static(b"PONG"));
    let expected = written_order(&outbox);
    let mut taken = Vec::new();
    assert_eq!(outbox.take_chunks(&mut taken, 3), 3 + 4 + 5);
    assert_eq!(outbox.len_bytes(), 5, "only data3 is left in the budget");
    // A control frame queued now goes before what is left, not before what was taken.
    outbox.push_control(Bytes::from_static(b"P"));
    assert_eq!(outbox.take_chunks(&mut taken, 16), 1 + 5);
    assert!(outbox.is_empty());
    assert_eq!(outbox.take_chunks(&mut taken, 16), 0);
    let sent: Vec<u8> = taken.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(&sent[..12], &expected[..12]);
    assert_eq!(&sent[12..], b"Pdata3");
}

#[test]
fn control_lane_is_bounded() {
    let mut outbox = Outbox::default();
    let pong = Bytes::from(vec![0u8; 127]);
    let queued = (0..1000)
        .filter(|_| outbox.push_control(pong.clone()))
        .count();
    assert_eq!(queued, MAX_CONTROL_BYTES / 127);
    assert_eq!(outbox.len_bytes(), 0);
}

fn frame(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn notice(tag: u32) -> impl Fn(u64, u64) -> Bytes {
    move |from, to| Bytes::from(format!("<gap{tag}:{from}-{to}>"))
}

#[test]
fn drop_oldest_sheds_messages_from_the_front_and_announces_once_per_channel() {
    let mut outbox = Outbox::default();
    outbox.push_message(frame("a1"), 1, 1);
    outbox.advance(1);
    outbox.push(frame("ack"));
    for seq in 2..=5 {
        outbox.push_message(frame(&format!("a{seq}")), 1, seq);
        outbox.push_message(frame(&format!("b{seq}")), 2, seq);
    }
    let shed = outbox.drop_oldest(8);
    assert_eq!(
        shed,
        [
            Shed {
                tag: 1,
                from: 2,
                to: 4
            },
            Shed {
                tag: 2,
                from: 2,
                to: 4
            }
        ]
    );
    for s in shed {
        outbox.announce(s, notice(s.tag));
    }
    // The started frame finishes, replies stay, each channel's notice comes first.
    assert_eq!(written_order(&outbox), b"1ack<gap1:2-4>a5<gap2:2-4>b5");
    // Shedding more widens the notice instead of adding one.
    outbox.push_message(frame("a6"), 1, 6);
    let shed = outbox.drop_oldest(0);
    assert_eq!(
        shed[0],
        Shed {
            tag: 1,
            from: 5,
            to: 6
        }
    );
    outbox.announce(shed[0], notice(1));
    assert!(written_order(&outbox).starts_with(b"1ack<gap1:2-6>"));
}

#[test]
fn conflate_keeps_the_newest_message_of_a_channel() {
    let mut outbox = Outbox::default();
    for seq in 1..=4 {
        outbox.push_message(frame(&format!("p{seq}")), 7, seq);
        outbox.push_message(frame(&format!("q{seq}")), 8, seq);
    }
    let shed = outbox.conflate(7).unwrap();
    assert_eq!(
        shed,
        Shed {
            tag: 7,
            from: 1,
            to: 3
        }
    );
    outbox.announce(shed, notice(7));
    assert_eq!(written_order(&outbox), b"q1q2q3<gap7:1-3>p4q4");
    assert_eq!(outbox.len_bytes(), written_order(&outbox).len());
    assert_eq!(outbox.conflate(9), None);
}

#[test]
fn one_frame_at_a_time_allocates_no_queue() {
    let mut outbox = Outbox::default();
    for _ in 0..3 {
        outbox.push_message(frame("msg"), 1, 1);
        assert!(!matches!(outbox.0, Queued::Lanes(_)));
        assert_eq!(outbox.len_bytes(), 3);
        outbox.advance(3);
        assert!(outbox.is_empty());
        assert!(outbox.push_control(frame("PING")));
        outbox.advance(1);
        assert_eq!(outbox.len_bytes(), 0);
        let mut taken = Vec::new();
        assert_eq!(outbox.take_chunks(&mut taken, 8), 3);
        assert!(outbox.is_empty());
    }
    assert!(!matches!(outbox.0, Queued::Lanes(_)));
}

#[test]
fn the_queue_goes_once_empty_and_a_lone_started_frame_keeps_its_place() {
    let mut outbox = Outbox::default();
    outbox.push(frame("abc"));
    outbox.advance(1);
    // A pong waits for the frame begun alone, then overtakes the unstarted one.
    outbox.push_control(frame("PONG"));
    outbox.push(frame("def"));
    assert!(matches!(outbox.0, Queued::Lanes(_)));
    assert_eq!(written_order(&outbox), b"bcPONGdef");
    assert_eq!(outbox.len_bytes(), 5);
    outbox.advance(9);
    assert!(outbox.is_empty());
    assert!(outbox.is_empty(), "an empty outbox holds no queue");
    // Alone, a started frame is neither shed nor discarded.
    outbox.push_message(frame("xyz"), 1, 9);
    outbox.advance(1);
    assert!(outbox.drop_oldest(0).is_empty());
    assert_eq!(outbox.discard_unstarted(), 2);
    assert_eq!(written_order(&outbox), b"yz");
}

#[test]
fn an_outbox_is_small() {
    assert!(size_of::<Outbox>() <= 48, "{}", size_of::<Outbox>());
}

#[test]
fn discard_keeps_a_started_frame() {
    let mut outbox = Outbox::default();
    outbox.push(Bytes::from_static(b"abc"));
    outbox.push(Bytes::from_static(b"def"));
    outbox.push(Bytes::from_static(b"ghi"));
    outbox.advance(1);
    assert_eq!(outbox.discard_unstarted(), 2);
    let mut fresh = Outbox::default();
    fresh.push(Bytes::from_static(b"abc"));
    assert_eq!(fresh.discard_unstarted(), 0);
}

#[test]
fn a_partly_written_lone_frame_stays_inline() {
    let mut outbox = Outbox::default();
    outbox.push_message(frame("abcd"), 1, 1);
    outbox.advance(1);
    assert!(
        matches!(outbox.0, Queued::Started(_)),
        "no queue for one frame"
    );
    outbox.advance(3);
    assert!(outbox.is_empty());
}

/// io_uring sends a lone frame from the outbox: the kernel reads its bytes until the
/// send completes, so nothing may move them, go before them or shed them meanwhile.
#[test]
fn a_started_lone_frame_is_sent_from_its_place_until_written() {
    let mut outbox = Outbox::default();
    assert!(outbox.start_lone().is_none(), "nothing queued");
    outbox.push_message(frame("m1"), 1, 1);
    let sent = outbox.start_lone().expect("one frame").clone();
    // A pong and a newer message queued while the send is under way go behind it.
    assert!(outbox.push_control(frame("PONG")));
    outbox.push_message(frame("m2"), 1, 2);
    outbox.push_message(frame("m3"), 1, 3);
    assert!(outbox.start_lone().is_none(), "several frames are taken");
    assert_eq!(written_order(&outbox), b"m1PONGm2m3");
    assert_eq!(
        outbox.len_bytes(),
        6,
        "a started frame counts in the budget"
    );
    // Shedding passes over it.
    assert_eq!(
        outbox.conflate(1),
        Some(Shed {
            tag: 1,
            from: 2,
            to: 2
        })
    );
    assert_eq!(
        outbox.drop_oldest(0),
        [Shed {
            tag: 1,
            from: 3,
            to: 3
        }]
    );
    let mut slices = [IoSlice::new(&[]); 4];
    assert_eq!(outbox.io_slices(&mut slices), 2);
    assert_eq!(slices[0].as_ptr(), sent.as_ptr(), "its bytes did not move");
    // The send completes short, then the rest.
    outbox.advance(1);
    assert_eq!(written_order(&outbox), b"1PONG");
    outbox.advance(5);
    assert!(outbox.is_empty());
    // A lone control frame is started as well; a pong after it waits its turn.
    outbox.push_control(frame("PING"));
    outbox.start_lone().expect("one frame");
    outbox.push(frame("data"));
    outbox.push_control(frame("PONG"));
    assert_eq!(written_order(&outbox), b"PINGPONGdata");
}

/// A dead connection's queue goes at once, except the frame a send is still reading.
#[test]
fn a_dead_queue_keeps_only_its_started_frame() {
    let mut outbox = Outbox::default();
    outbox.push(frame("abc"));
    outbox.push(frame("def"));
    outbox.discard_all_but_started();
    assert!(outbox.is_empty(), "nothing started");

    outbox.push(frame("abc"));
    let sent = outbox.start_lone().expect("one frame").as_ptr();
    outbox.push_control(frame("PONG"));
    outbox.push(frame("def"));
    outbox.discard_all_but_started();
    assert!(
        matches!(outbox.0, Queued::Started(_)),
        "the queue is given back"
    );
    let mut slices = [IoSlice::new(&[]); 4];
    assert_eq!(outbox.io_slices(&mut slices), 1);
    assert_eq!(slices[0].as_ptr(), sent);
    assert_eq!(written_order(&outbox), b"abc");

    let mut partly = Outbox::default();
    partly.push(frame("abc"));
    partly.push(frame("def"));
    partly.advance(1);
    partly.discard_all_but_started();
    assert_eq!(written_order(&partly), b"bc");

    let mut control = Outbox::default();
    control.push_control(frame("PING"));
    control.discard_all_but_started();
    assert!(control.is_empty());
}
