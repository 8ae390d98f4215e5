//! Issue 12, 3(c): the proxy pre-allocated request bodies from `content-length`, so a
//! thousand connections announcing 64 MiB and stalling grew the EPP by gigabytes (with
//! mimalloc and transparent huge pages, a buffer's capacity becomes resident as soon as a few
//! bytes land in it). Here the real `llmsched epp` process (release allocator and all) gets
//! 500 such uploads on real sockets; its resident memory must grow by what they sent plus
//! per-connection bookkeeping, not by what they announced. With the old pre-sizing restored
//! this test measured 1.1 GB of growth for the 500 uploads (2.2 MB each); the bound is
//! 120 MB.
//!
//! Nothing is timed: the test waits (with a deadline) until the EPP has read every byte the
//! clients sent, then reads `/proc/<pid>/status`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const CONNECTIONS: usize = 500;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// `(connections, bytes not yet read)` of established connections accepted on `port`, from
/// `/proc/net/tcp` (`local_address` = `IP:PORT` in hex, `st` 01 = established,
/// `rx_queue` = bytes the server has not read).
fn server_side(port: u16) -> (usize, u64) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut n = 0;
    let mut unread = 0;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(st), Some(queues)) = (f.get(1), f.get(3), f.get(4)) else {
            continue;
        };
        let local_port = local
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        if local_port != Some(port) || *st != "01" {
            continue;
        }
        n += 1;
        unread += queues
            .split(':')
            .nth(1)
            .and_then(|q| u64::from_str_radix(q, 16).ok())
            .unwrap_or(0);
    }
    (n, unread)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_uploads_cost_what_they_sent_not_what_they_announced() {
    init_logs();
    let sim = SimProc::start("127.0.0.91", 10.0).await;
    let epp = EppProc::start(&[sim.addr], &[]).await;
    let pid = epp.child.id().unwrap();
    let proxy: SocketAddr = epp.proxy;
    let before = rss_kb(pid);

    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"model\":\"m\",\"prompt\":\"",
        64 << 20
    );
    let chunk = vec![b'x'; 4096];
    let mut conns = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&chunk).await.unwrap();
        conns.push(s);
    }
    // A second piece each: the old code sized its buffer from content-length here.
    for s in &mut conns {
        s.write_all(&chunk).await.unwrap();
    }
    wait_until("the EPP to read every byte of every upload", || {
        server_side(proxy.port()) == (CONNECTIONS, 0)
    })
    .await;
    // A real request on another connection is answered after those frames were handed on.
    let (status, _) = get(proxy, "/v1/models")
        .await
        .expect("the proxy still serves");
    assert_eq!(status, 200);

    let grown = rss_kb(pid).saturating_sub(before);
    assert!(
        grown < 120 * 1024,
        "the EPP grew by {grown} kB for {CONNECTIONS} uploads of 8 KiB announcing 64 MiB each"
    );
    drop(conns);
}
