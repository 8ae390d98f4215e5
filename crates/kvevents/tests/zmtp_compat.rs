//! ZMTP details checked byte by byte with hand-driven peers on real sockets: subscriptions in
//! the ZMTP 3.0 form (a message `0x01 + topic`) and the 3.1 form (a SUBSCRIBE command),
//! publisher-side prefix filtering, CANCEL, PING → PONG, and long frames.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use llmsched_kvevents::zmtp::{
    self, Decoded, Decoder, Limits, PubSocket, RouterSocket, SubSocket, TransportStats,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn ready(socket_type: &str) -> BytesMut {
    let mut props = BytesMut::new();
    props.put_u8(11);
    props.put_slice(b"Socket-Type");
    props.put_u32(socket_type.len() as u32);
    props.put_slice(socket_type.as_bytes());
    let mut out = BytesMut::new();
    zmtp::encode_command(b"READY", &props, &mut out);
    out
}

/// A hand-driven peer speaking ZMTP 3.`minor`.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
    d: Decoder,
}

impl Raw {
    async fn handshake(s: TcpStream, minor: u8, socket_type: &str) -> Raw {
        let mut s = s;
        let mut g = zmtp::greeting();
        g[11] = minor;
        s.write_all(&g).await.unwrap();
        let mut peer = [0u8; 64];
        s.read_exact(&mut peer).await.unwrap();
        assert_eq!((peer[10], peer[11]), (3, 1), "we announce ZMTP 3.1");
        s.write_all(&ready(socket_type)).await.unwrap();
        let mut raw = Raw {
            s,
            buf: BytesMut::new(),
            d: Decoder::new(&Limits::default()),
        };
        match raw.next().await {
            Decoded::Command(c) => assert_eq!(&c.name[..], b"READY"),
            other => panic!("expected READY, got {other:?}"),
        }
        raw
    }

    async fn next(&mut self) -> Decoded {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(x) = self.d.decode(&mut self.buf).unwrap() {
                return x;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.s.read_buf(&mut self.buf))
                .await
                .expect("nothing arrived")
                .unwrap();
            assert!(n > 0, "connection closed");
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }
}

fn stats() -> Arc<TransportStats> {
    Arc::new(TransportStats::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_subscribes_with_a_command_to_3_1_and_a_message_to_3_0_publishers() {
    for minor in [0u8, 1] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = format!("tcp://{}", listener.local_addr().unwrap());
        let connect = tokio::spawn(async move {
            SubSocket::connect(&ep, &[b"kv@"], Limits::default(), stats()).await
        });
        let (s, _) = listener.accept().await.unwrap();
        let mut raw = Raw::handshake(s, minor, "PUB").await;
        let mut sub = connect.await.unwrap().unwrap();
        let sub_msg = raw.next().await;
        if minor == 1 {
            assert_eq!(
                sub_msg,
                Decoded::Command(zmtp::Command {
                    name: Bytes::from_static(b"SUBSCRIBE"),
                    data: Bytes::from_static(b"kv@"),
                })
            );
        } else {
            assert_eq!(
                sub_msg,
                Decoded::Message(vec![Bytes::from_static(b"\x01kv@")])
            );
        }
        // A publisher that does not filter: the SUB filters too.
        let mut out = BytesMut::new();
        zmtp::encode_message(&[&b"other"[..], b"no"], &mut out);
        let long = vec![7u8; 1000];
        zmtp::encode_message(&[&b"kv@a"[..], &long[..]], &mut out);
        raw.send(&out).await;
        let got = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, vec![Bytes::from_static(b"kv@a"), Bytes::from(long)]);
        // Unsubscribing sends CANCEL (3.1) or 0x00 + topic (3.0).
        sub.unsubscribe(b"kv@");
        let cancel = raw.next().await;
        if minor == 1 {
            assert!(matches!(cancel, Decoded::Command(c) if &c.name[..] == b"CANCEL"));
        } else {
            assert_eq!(
                cancel,
                Decoded::Message(vec![Bytes::from_static(b"\x00kv@")])
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_filters_by_prefix_for_either_subscription_form() {
    let mut p = PubSocket::new(Limits::default(), stats());
    let ep = p.bind("tcp://127.0.0.1:0").await.unwrap();
    let addr = ep.trim_start_matches("tcp://");
    let mut v30 = Raw::handshake(TcpStream::connect(addr).await.unwrap(), 0, "SUB").await;
    let mut v31 = Raw::handshake(TcpStream::connect(addr).await.unwrap(), 1, "SUB").await;
    let mut out = BytesMut::new();
    zmtp::encode_message(&[&b"\x01kv@a"[..]], &mut out);
    v30.send(&out).await;
    let mut out = BytesMut::new();
    zmtp::encode_command(b"SUBSCRIBE", b"kv@b", &mut out);
    v31.send(&out).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.subscribed_count() < 2 {
        assert!(Instant::now() < deadline, "subscriptions not seen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for topic in ["kv@a1", "kv@b1", "zz", "kv@a2", "kv@b2"] {
        p.send(&[
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::from_static(b"payload"),
        ]);
    }
    let topics = |d: Decoded| match d {
        Decoded::Message(f) => String::from_utf8_lossy(&f[0]).into_owned(),
        other => panic!("{other:?}"),
    };
    assert_eq!(topics(v30.next().await), "kv@a1");
    assert_eq!(topics(v30.next().await), "kv@a2");
    assert_eq!(topics(v31.next().await), "kv@b1");
    assert_eq!(topics(v31.next().await), "kv@b2");

    // PING (TTL + context) is answered by PONG with the same context.
    let mut out = BytesMut::new();
    zmtp::encode_command(b"PING", b"\x00\x0actx", &mut out);
    v31.send(&out).await;
    assert_eq!(
        v31.next().await,
        Decoded::Command(zmtp::Command {
            name: Bytes::from_static(b"PONG"),
            data: Bytes::from_static(b"ctx"),
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_assigns_or_honours_identities_and_routes_replies() {
    let mut r = RouterSocket::bind("tcp://127.0.0.1:0", Limits::default(), stats())
        .await
        .unwrap();
    let addr = r.endpoint().trim_start_matches("tcp://").to_string();
    // A DEALER announcing its identity.
    let mut named = TcpStream::connect(&addr).await.unwrap();
    named.write_all(&zmtp::greeting()).await.unwrap();
    let mut props = BytesMut::new();
    for (k, v) in [("Socket-Type", "DEALER"), ("Identity", "me")] {
        props.put_u8(k.len() as u8);
        props.put_slice(k.as_bytes());
        props.put_u32(v.len() as u32);
        props.put_slice(v.as_bytes());
    }
    let mut out = BytesMut::new();
    zmtp::encode_command(b"READY", &props, &mut out);
    zmtp::encode_message(&[&b""[..], b"hello"], &mut out);
    named.write_all(&out).await.unwrap();
    let got = r.recv().await.unwrap();
    assert_eq!(
        got,
        vec![
            Bytes::from_static(b"me"),
            Bytes::new(),
            Bytes::from_static(b"hello")
        ]
    );
    // An anonymous DEALER gets a generated 5-byte identity starting with 0.
    let mut anon = Raw::handshake(TcpStream::connect(&addr).await.unwrap(), 1, "DEALER").await;
    let mut out = BytesMut::new();
    zmtp::encode_message(&[&b""[..], b"hi"], &mut out);
    anon.send(&out).await;
    let got = r.recv().await.unwrap();
    assert_eq!(got[0].len(), 5);
    assert_eq!(got[0][0], 0);
    r.send(&[got[0].clone(), Bytes::new(), Bytes::from_static(b"back")])
        .await
        .unwrap();
    assert_eq!(
        anon.next().await,
        Decoded::Message(vec![Bytes::new(), Bytes::from_static(b"back")])
    );
    assert!(matches!(
        r.send(&[Bytes::from_static(b"nobody"), Bytes::new()]).await,
        Err(zmtp::ZmqError::UnknownPeer)
    ));
}
