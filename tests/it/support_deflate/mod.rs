//! A raw WebSocket client that may negotiate permessage-deflate, for the compression
//! tests on one node (tests/it/compression.rs) and across a cluster (tests/it/cluster.rs). It
//! inflates with `herald::proto::deflate`, a raw DEFLATE codec independent of the
//! server's framing.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use herald::proto::deflate::Inflater;
use herald::proto::frame::{FrameHeader, OpCode, encode_client_frame};

use crate::support::{self, Head, read_head, upgrade_request};

pub(crate) const T5: Duration = Duration::from_secs(5);
pub(crate) const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// One server frame: its header, its payload as sent, and its whole encoding.
pub(crate) struct Frame {
    pub(crate) header: FrameHeader,
    pub(crate) payload: Vec<u8>,
    pub(crate) bytes: Vec<u8>,
}

impl Frame {
    pub(crate) fn compressed(&self) -> bool {
        self.header.rsv == 0b100
    }
}

/// A raw WebSocket client that may have negotiated permessage-deflate.
pub(crate) struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    head: Head,
    inflater: Inflater,
}

impl Client {
    pub(crate) fn connect(addr: SocketAddr, path: &str, offer: Option<&str>) -> Self {
        let mut request = upgrade_request(path);
        if let Some(offer) = offer {
            request.insert_str(
                request.len() - 2,
                &format!("Sec-WebSocket-Extensions: {offer}\r\n"),
            );
        }
        let mut stream = support::raw_connect(addr);
        stream.write_all(request.as_bytes()).unwrap();
        let head = read_head(&mut stream);
        assert_eq!(head.status, 101, "{head:?}");
        Self {
            stream,
            buf: head.rest.clone(),
            head,
            inflater: Inflater::default(),
        }
    }

    pub(crate) fn extensions(&self) -> Option<&str> {
        self.head.header("Sec-WebSocket-Extensions")
    }

    pub(crate) fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub(crate) fn send_text(&mut self, text: &str) {
        let frame = encode_client_frame(OpCode::Text, true, text.as_bytes(), MASK);
        self.send_raw(&frame);
    }

    /// Sends `payload` as one compressed message (RSV1 on its first frame).
    pub(crate) fn send_compressed(&mut self, opcode: OpCode, compressed: &[u8]) {
        let mut frame = encode_client_frame(opcode, true, compressed, MASK);
        frame[0] |= 0x40;
        self.send_raw(&frame);
    }

    pub(crate) fn recv(&mut self) -> Option<Frame> {
        let deadline = Instant::now() + T5;
        loop {
            if let Some((header, len)) = FrameHeader::parse(&self.buf).unwrap() {
                let end = len + header.payload_len as usize;
                if self.buf.len() >= end {
                    let bytes: Vec<u8> = self.buf.drain(..end).collect();
                    return Some(Frame {
                        header,
                        payload: bytes[len..].to_vec(),
                        bytes,
                    });
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no frame within {T5:?}");
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next data message, inflated if it came compressed; with the frame as sent.
    pub(crate) fn recv_message(&mut self) -> (String, Frame) {
        loop {
            let frame = self.recv().expect("connection ended");
            match frame.header.opcode {
                OpCode::Text => {
                    let payload = if frame.compressed() {
                        self.inflater
                            .inflate(&frame.payload, 1 << 24)
                            .unwrap()
                            .to_vec()
                    } else {
                        frame.payload.clone()
                    };
                    return (String::from_utf8(payload).unwrap(), frame);
                }
                OpCode::Ping | OpCode::Pong => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    pub(crate) fn expect_close(&mut self) -> u16 {
        loop {
            let frame = self.recv().expect("connection ended without a close frame");
            if frame.header.opcode == OpCode::Close {
                return u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
            }
        }
    }

    pub(crate) fn subscribe(&mut self, channel: &str) {
        self.send_text(&format!(
            r#"{{"type":"subscribe","channel":"{channel}","id":1}}"#
        ));
        let (reply, _) = self.recv_message();
        assert!(reply.contains(r#""type":"subscribed""#), "{reply}");
    }
}
