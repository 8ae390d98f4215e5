//! The four socket types: PUB, SUB, ROUTER, DEALER.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};

use super::codec::{self, Command};
use super::conn::{self, Conn, End, Handler, HandshakeError};
use super::{
    ErrorReason, Limits, SocketType, TransportError, TransportStats, ZmqError, endpoint_of,
    parse_endpoint,
};

/// Aborts its tasks when dropped.
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl Tasks {
    /// Aborts the tasks and waits until they are gone (an aborted task is dropped by the
    /// runtime later; waiting makes sure its listener is closed when this returns).
    async fn close(mut self) {
        for t in std::mem::take(&mut self.0) {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Binds a listener to a `tcp://host:port` endpoint.
async fn listen(endpoint: &str) -> Result<TcpListener, ZmqError> {
    let (host, port) = parse_endpoint(endpoint)?;
    TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|source| ZmqError::Io {
            endpoint: endpoint.to_string(),
            source,
        })
}

/// Resolves and connects to a `tcp://host:port` endpoint within `limits.connect_timeout`.
async fn dial(endpoint: &str, limits: &Limits) -> Result<TcpStream, ZmqError> {
    let (host, port) = parse_endpoint(endpoint)?;
    let io = |source| ZmqError::Io {
        endpoint: endpoint.to_string(),
        source,
    };
    match tokio::time::timeout(
        limits.connect_timeout,
        TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(r) => r.map_err(io),
        Err(_) => Err(ZmqError::ConnectTimeout(endpoint.to_string())),
    }
}

/// Dials and handshakes; protocol errors are counted in `stats`.
async fn dial_and_handshake(
    endpoint: &str,
    ours: SocketType,
    limits: &Limits,
    stats: &TransportStats,
) -> Result<Conn, ZmqError> {
    let stream = dial(endpoint, limits).await?;
    let addr = stream.peer_addr().ok();
    match conn::handshake(stream, ours, &[], limits).await {
        Ok(c) => {
            stats.connections.fetch_add(1, Ordering::Relaxed);
            Ok(c)
        }
        Err(HandshakeError::Protocol(e)) => {
            stats.record(&e, addr);
            Err(ZmqError::Transport(e))
        }
        Err(HandshakeError::Silent) => Err(ZmqError::Closed),
        Err(HandshakeError::Io(source)) => Err(ZmqError::Io {
            endpoint: endpoint.to_string(),
            source,
        }),
    }
}

/// Logs (and counts) how a connection ended.
fn report_end(end: End, peer: Option<SocketAddr>, stats: &TransportStats) {
    let peer_s = peer.map_or_else(|| "-".to_string(), |p| p.to_string());
    match end {
        End::Closed => tracing::debug!(peer = %peer_s, "ZMQ connection closed"),
        End::Io(e) => tracing::debug!(peer = %peer_s, error = %e, "ZMQ connection lost"),
        End::Protocol(e) => stats.record(&e, peer),
    }
}

/// Accepts connections on `listener` (at most `limits.max_connections` at once), handshakes
/// each as `ours` and hands it to `on_conn`. Runs until aborted; aborting it closes every
/// connection it accepted.
fn spawn_acceptor<F, Fut>(
    listener: TcpListener,
    ours: SocketType,
    limits: Limits,
    stats: Arc<TransportStats>,
    on_conn: F,
) -> JoinHandle<()>
where
    F: Fn(Conn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = End> + Send + 'static,
{
    let on_conn = Arc::new(on_conn);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let mut conns = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                Some(_) = conns.join_next() => continue,
            };
            let (stream, addr) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "ZMQ accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                stats.record(
                    &TransportError::new(
                        ErrorReason::ConnectionLimit,
                        format!(
                            "{} connections already open; closing the new one",
                            limits.max_connections
                        ),
                    ),
                    Some(addr),
                );
                drop(stream);
                continue;
            };
            let limits = limits.clone();
            let stats = stats.clone();
            let on_conn = on_conn.clone();
            conns.spawn(async move {
                let _permit = permit;
                match conn::handshake(stream, ours, &[], &limits).await {
                    Ok(c) => {
                        stats.connections.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = %addr, peer_type = c.peer.socket_type.name(), "ZMQ peer connected");
                        let end = on_conn(c).await;
                        report_end(end, Some(addr), &stats);
                    }
                    Err(HandshakeError::Protocol(e)) => stats.record(&e, Some(addr)),
                    Err(HandshakeError::Silent) => {
                        tracing::debug!(peer = %addr, "ZMQ connection closed before the greeting")
                    }
                    Err(HandshakeError::Io(e)) => {
                        tracing::debug!(peer = %addr, error = %e, "ZMQ handshake I/O error")
                    }
                }
            });
        }
    })
}

/// Whether `topic` matches one of `subs` (ZMQ prefix semantics; empty matches everything).
fn matches(subs: &[(Bytes, u32)], topic: &[u8]) -> bool {
    subs.iter().any(|(p, _)| topic.starts_with(p))
}

// ---------------------------------------------------------------------------------------
// PUB

struct PubPeer {
    id: u64,
    tx: mpsc::Sender<Vec<Bytes>>,
    subs: Vec<(Bytes, u32)>,
    sub_bytes: usize,
}

struct PubShared {
    limits: Limits,
    stats: Arc<TransportStats>,
    peers: RwLock<Vec<PubPeer>>,
    next_id: AtomicU64,
}

impl PubShared {
    /// Applies a SUBSCRIBE (`on`) or CANCEL from peer `id`, counted like libzmq's trie.
    fn subscription(&self, id: u64, topic: Bytes, on: bool) -> Result<(), TransportError> {
        let mut peers = self.peers.write();
        let Some(p) = peers.iter_mut().find(|p| p.id == id) else {
            return Ok(());
        };
        let pos = p.subs.iter().position(|(t, _)| *t == topic);
        match (on, pos) {
            (true, Some(i)) => p.subs[i].1 = p.subs[i].1.saturating_add(1),
            (true, None) => {
                if p.subs.len() >= self.limits.max_subscriptions {
                    return Err(TransportError::new(
                        ErrorReason::TooManySubscriptions,
                        format!("more than {} subscriptions", self.limits.max_subscriptions),
                    ));
                }
                if p.sub_bytes + topic.len() > self.limits.max_command_bytes {
                    return Err(TransportError::new(
                        ErrorReason::TooManySubscriptions,
                        format!(
                            "subscriptions longer than {} bytes in total",
                            self.limits.max_command_bytes
                        ),
                    ));
                }
                p.sub_bytes += topic.len();
                p.subs.push((topic, 1));
            }
            (false, Some(i)) => {
                p.subs[i].1 -= 1;
                if p.subs[i].1 == 0 {
                    let (t, _) = p.subs.swap_remove(i);
                    p.sub_bytes -= t.len();
                }
            }
            (false, None) => {}
        }
        Ok(())
    }
}

struct PubHandler {
    shared: Arc<PubShared>,
    id: u64,
}

impl Handler for PubHandler {
    fn message(
        &mut self,
        frames: Vec<Bytes>,
    ) -> impl Future<Output = Result<bool, TransportError>> + Send {
        // ZMTP 3.0 subscriptions: one frame, 0x01 (subscribe) or 0x00 (cancel) + topic.
        // Anything else a subscriber sends is dropped, as libzmq's PUB does.
        let result = match frames.as_slice() {
            [f] if f.first() == Some(&1) || f.first() == Some(&0) => self
                .shared
                .subscription(self.id, f.slice(1..), f[0] == 1)
                .map(|()| true),
            _ => Ok(true),
        };
        std::future::ready(result)
    }

    fn command(&mut self, cmd: &Command) -> Result<(), TransportError> {
        match cmd.name.as_ref() {
            b"SUBSCRIBE" => self.shared.subscription(self.id, cmd.data.clone(), true),
            b"CANCEL" => self.shared.subscription(self.id, cmd.data.clone(), false),
            _ => Ok(()),
        }
    }
}

async fn run_pub_conn(shared: Arc<PubShared>, conn: Conn) -> End {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(shared.limits.send_queue.max(1));
    shared.peers.write().push(PubPeer {
        id,
        tx,
        subs: Vec::new(),
        sub_bytes: 0,
    });
    let end = conn::drive(
        conn,
        rx,
        PubHandler {
            shared: shared.clone(),
            id,
        },
    )
    .await;
    shared.peers.write().retain(|p| p.id != id);
    end
}

/// A PUB socket: sends each message to every subscriber whose subscriptions match its first
/// frame; a subscriber whose queue ([`Limits::send_queue`] messages) is full misses it.
/// [`PubSocket::send`] never blocks.
pub struct PubSocket {
    shared: Arc<PubShared>,
    tasks: Tasks,
}

impl std::fmt::Debug for PubSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSocket")
            .field("subscribers", &self.subscriber_count())
            .finish()
    }
}

impl PubSocket {
    /// Closes the socket and waits until its listener and connections are closed, so its
    /// port can be bound again at once.
    pub async fn close(self) {
        self.tasks.close().await;
    }

    /// A socket with no connections yet; errors are counted in `stats`.
    pub fn new(limits: Limits, stats: Arc<TransportStats>) -> Self {
        Self {
            shared: Arc::new(PubShared {
                limits,
                stats,
                peers: RwLock::new(Vec::new()),
                next_id: AtomicU64::new(0),
            }),
            tasks: Tasks::default(),
        }
    }

    /// Listens on `endpoint` (`tcp://*:5557`, `tcp://127.0.0.1:0`...); returns the bound
    /// endpoint with the real port. Needs a tokio runtime.
    pub async fn bind(&mut self, endpoint: &str) -> Result<String, ZmqError> {
        let listener = listen(endpoint).await?;
        let local = listener.local_addr().map_err(|source| ZmqError::Io {
            endpoint: endpoint.to_string(),
            source,
        })?;
        let shared = self.shared.clone();
        self.tasks.0.push(spawn_acceptor(
            listener,
            SocketType::Pub,
            self.shared.limits.clone(),
            self.shared.stats.clone(),
            move |c| run_pub_conn(shared.clone(), c),
        ));
        Ok(endpoint_of(local))
    }

    /// Dials `endpoint` in the background, and again `reconnect_interval` after each failure
    /// or lost connection, like libzmq. Needs a tokio runtime.
    pub fn connect(&mut self, endpoint: &str, reconnect_interval: Duration) {
        let shared = self.shared.clone();
        let endpoint = endpoint.to_string();
        self.tasks.0.push(tokio::spawn(async move {
            let mut failures = 0u64;
            loop {
                match dial_and_handshake(
                    &endpoint,
                    SocketType::Pub,
                    &shared.limits,
                    &shared.stats,
                )
                .await
                {
                    Ok(c) => {
                        failures = 0;
                        let peer = c.peer.addr;
                        tracing::info!(%endpoint, "ZMQ PUB connected");
                        let end = run_pub_conn(shared.clone(), c).await;
                        report_end(end, peer, &shared.stats);
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(60) {
                            tracing::debug!(%endpoint, error = %e, failures, "ZMQ PUB cannot connect yet");
                        }
                    }
                }
                tokio::time::sleep(reconnect_interval).await;
            }
        }));
    }

    /// Queues `frames` for every matching subscriber; returns how many it was queued for.
    /// Subscribers with a full queue miss it (counted in [`TransportStats::hwm_drops`]).
    pub fn send(&self, frames: &[Bytes]) -> usize {
        let Some(topic) = frames.first() else {
            return 0;
        };
        let peers = self.shared.peers.read();
        let mut wire: Option<Vec<Bytes>> = None;
        let mut sent = 0;
        for p in peers.iter().filter(|p| matches(&p.subs, topic)) {
            let parts = wire
                .get_or_insert_with(|| codec::encode_message_parts(frames))
                .clone();
            match p.tx.try_send(parts) {
                Ok(()) => sent += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.shared.stats.hwm_drops.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        sent
    }

    /// Connected subscribers (whether or not they subscribed to anything).
    pub fn subscriber_count(&self) -> usize {
        self.shared.peers.read().len()
    }

    /// Messages queued for subscribers and not yet handed to their connections.
    pub fn queued(&self) -> usize {
        self.shared
            .peers
            .read()
            .iter()
            .map(|p| p.tx.max_capacity() - p.tx.capacity())
            .sum()
    }

    /// Connected subscribers with at least one subscription.
    pub fn subscribed_count(&self) -> usize {
        self.shared
            .peers
            .read()
            .iter()
            .filter(|p| !p.subs.is_empty())
            .count()
    }
}

// ---------------------------------------------------------------------------------------
// SUB

struct SubPeer {
    id: u64,
    tx: mpsc::Sender<Vec<Bytes>>,
    commands: bool,
}

struct SubShared {
    stats: Arc<TransportStats>,
    topics: RwLock<Vec<(Bytes, u32)>>,
    peers: Mutex<Vec<SubPeer>>,
    next_id: AtomicU64,
}

fn encode_subscription(topic: &[u8], on: bool, commands: bool) -> Vec<Bytes> {
    let mut out = BytesMut::new();
    if commands {
        codec::encode_command(if on { b"SUBSCRIBE" } else { b"CANCEL" }, topic, &mut out);
    } else {
        let mut body = BytesMut::with_capacity(1 + topic.len());
        body.put_u8(u8::from(on));
        body.put_slice(topic);
        codec::encode_message(&[body], &mut out);
    }
    vec![out.freeze()]
}

struct SubHandler {
    shared: Arc<SubShared>,
    inbound: mpsc::Sender<Vec<Bytes>>,
}

impl Handler for SubHandler {
    fn message(
        &mut self,
        frames: Vec<Bytes>,
    ) -> impl Future<Output = Result<bool, TransportError>> + Send {
        // Filter here too, as libzmq's SUB does: a publisher may not filter.
        let wanted = frames
            .first()
            .is_some_and(|t| matches(&self.shared.topics.read(), t));
        async move {
            if !wanted {
                return Ok(true);
            }
            Ok(self.inbound.send(frames).await.is_ok())
        }
    }

    fn command(&mut self, _cmd: &Command) -> Result<(), TransportError> {
        Ok(())
    }
}

async fn run_sub_conn(
    shared: Arc<SubShared>,
    conn: Conn,
    inbound: mpsc::Sender<Vec<Bytes>>,
) -> End {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let commands = conn.peer.greeting.uses_subscribe_commands();
    let (tx, rx) = mpsc::channel(64);
    {
        // Registered under the topics lock so a concurrent subscribe() is sent exactly once.
        let topics = shared.topics.read();
        for (t, _) in topics.iter() {
            let _ = tx.try_send(encode_subscription(t, true, commands));
        }
        shared.peers.lock().push(SubPeer { id, tx, commands });
    }
    let end = conn::drive(
        conn,
        rx,
        SubHandler {
            shared: shared.clone(),
            inbound,
        },
    )
    .await;
    shared.peers.lock().retain(|p| p.id != id);
    end
}

/// A SUB socket, bound (any number of publishers dial in) or connected (one publisher).
pub struct SubSocket {
    shared: Arc<SubShared>,
    rx: mpsc::Receiver<Vec<Bytes>>,
    local: Option<SocketAddr>,
    _tasks: Tasks,
}

impl std::fmt::Debug for SubSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubSocket")
            .field("local", &self.local)
            .finish()
    }
}

impl SubSocket {
    fn shared(stats: Arc<TransportStats>, topics: &[&[u8]]) -> Arc<SubShared> {
        let mut t: Vec<(Bytes, u32)> = Vec::new();
        for topic in topics {
            if !t.iter().any(|(x, _)| x.as_ref() == *topic) {
                t.push((Bytes::copy_from_slice(topic), 1));
            }
        }
        Arc::new(SubShared {
            stats,
            topics: RwLock::new(t),
            peers: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// Listens on `endpoint` and receives from every publisher that connects, subscribed to
    /// `topics` (prefixes; `b""` = everything). Needs a tokio runtime.
    pub async fn bind(
        endpoint: &str,
        topics: &[&[u8]],
        limits: Limits,
        stats: Arc<TransportStats>,
    ) -> Result<Self, ZmqError> {
        let listener = listen(endpoint).await?;
        Self::from_listener(listener, topics, limits, stats)
    }

    /// Like [`Self::bind`] on an already bound listener (e.g. bound synchronously so a taken
    /// port fails early). Needs a tokio runtime.
    pub fn from_std_listener(
        listener: std::net::TcpListener,
        topics: &[&[u8]],
        limits: Limits,
        stats: Arc<TransportStats>,
    ) -> Result<Self, ZmqError> {
        let io = |source| ZmqError::Io {
            endpoint: "listener".into(),
            source,
        };
        listener.set_nonblocking(true).map_err(io)?;
        let listener = TcpListener::from_std(listener).map_err(io)?;
        Self::from_listener(listener, topics, limits, stats)
    }

    fn from_listener(
        listener: TcpListener,
        topics: &[&[u8]],
        limits: Limits,
        stats: Arc<TransportStats>,
    ) -> Result<Self, ZmqError> {
        let local = listener.local_addr().map_err(|source| ZmqError::Io {
            endpoint: "listener".into(),
            source,
        })?;
        let (in_tx, rx) = mpsc::channel(limits.recv_queue.max(1));
        let shared = Self::shared(stats.clone(), topics);
        let s = shared.clone();
        let acceptor = spawn_acceptor(listener, SocketType::Sub, limits, stats, move |c| {
            run_sub_conn(s.clone(), c, in_tx.clone())
        });
        Ok(Self {
            shared,
            rx,
            local: Some(local),
            _tasks: Tasks(vec![acceptor]),
        })
    }

    /// Dials one publisher and completes the handshake; [`Self::recv`] fails with
    /// [`ZmqError::Closed`] once that connection ends (the caller decides when to re-dial).
    pub async fn connect(
        endpoint: &str,
        topics: &[&[u8]],
        limits: Limits,
        stats: Arc<TransportStats>,
    ) -> Result<Self, ZmqError> {
        let conn = dial_and_handshake(endpoint, SocketType::Sub, &limits, &stats).await?;
        let (in_tx, rx) = mpsc::channel(limits.recv_queue.max(1));
        let shared = Self::shared(stats, topics);
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let peer = conn.peer.addr;
            let end = run_sub_conn(s.clone(), conn, in_tx).await;
            report_end(end, peer, &s.stats);
        });
        Ok(Self {
            shared,
            rx,
            local: None,
            _tasks: Tasks(vec![task]),
        })
    }

    /// Adds a subscription (sent to every connected publisher, and to later ones).
    pub fn subscribe(&self, topic: &[u8]) {
        self.change(topic, true);
    }

    /// Removes a subscription added once.
    pub fn unsubscribe(&self, topic: &[u8]) {
        self.change(topic, false);
    }

    fn change(&self, topic: &[u8], on: bool) {
        let mut topics = self.shared.topics.write();
        let pos = topics.iter().position(|(t, _)| t.as_ref() == topic);
        let send = match (on, pos) {
            (true, Some(i)) => {
                topics[i].1 += 1;
                false
            }
            (true, None) => {
                topics.push((Bytes::copy_from_slice(topic), 1));
                true
            }
            (false, Some(i)) => {
                topics[i].1 -= 1;
                if topics[i].1 == 0 {
                    topics.swap_remove(i);
                    true
                } else {
                    false
                }
            }
            (false, None) => false,
        };
        if send {
            for p in self.shared.peers.lock().iter() {
                let _ = p.tx.try_send(encode_subscription(topic, on, p.commands));
            }
        }
    }

    /// The bound address (bound sockets).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The bound endpoint, `tcp://ip:port` (bound sockets).
    pub fn endpoint(&self) -> Option<String> {
        self.local.map(endpoint_of)
    }

    /// Publishers currently connected (handshake done).
    pub fn peer_count(&self) -> usize {
        self.shared.peers.lock().len()
    }

    /// The next message (its frames). A connected socket fails with [`ZmqError::Closed`]
    /// when its connection ends.
    pub async fn recv(&mut self) -> Result<Vec<Bytes>, ZmqError> {
        self.rx.recv().await.ok_or(ZmqError::Closed)
    }
}

// ---------------------------------------------------------------------------------------
// ROUTER

struct RouterShared {
    limits: Limits,
    stats: Arc<TransportStats>,
    peers: Mutex<HashMap<Bytes, mpsc::Sender<Vec<Bytes>>>>,
    next_id: AtomicU32,
}

struct ForwardHandler {
    identity: Option<Bytes>,
    inbound: mpsc::Sender<Vec<Bytes>>,
}

impl Handler for ForwardHandler {
    fn message(
        &mut self,
        mut frames: Vec<Bytes>,
    ) -> impl Future<Output = Result<bool, TransportError>> + Send {
        if let Some(id) = &self.identity {
            frames.insert(0, id.clone());
        }
        async move { Ok(self.inbound.send(frames).await.is_ok()) }
    }

    fn command(&mut self, _cmd: &Command) -> Result<(), TransportError> {
        Ok(())
    }
}

async fn run_router_conn(
    shared: Arc<RouterShared>,
    conn: Conn,
    inbound: mpsc::Sender<Vec<Bytes>>,
) -> End {
    let (tx, rx) = mpsc::channel(shared.limits.send_queue.max(1));
    let identity = {
        let mut peers = shared.peers.lock();
        let wanted = &conn.peer.identity;
        // libzmq reserves identities starting with a zero byte for generated ones.
        let id = if !wanted.is_empty() && wanted[0] != 0 && !peers.contains_key(wanted) {
            wanted.clone()
        } else {
            let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
            let mut id = BytesMut::with_capacity(5);
            id.put_u8(0);
            id.put_u32(n);
            id.freeze()
        };
        peers.insert(id.clone(), tx);
        id
    };
    let end = conn::drive(
        conn,
        rx,
        ForwardHandler {
            identity: Some(identity.clone()),
            inbound,
        },
    )
    .await;
    shared.peers.lock().remove(&identity);
    end
}

/// A bound ROUTER socket: messages arrive with the sender's identity as first frame; a reply
/// starting with that identity goes back to it (waiting while its queue is full).
pub struct RouterSocket {
    shared: Arc<RouterShared>,
    rx: mpsc::Receiver<Vec<Bytes>>,
    local: SocketAddr,
    _tasks: Tasks,
}

impl std::fmt::Debug for RouterSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterSocket")
            .field("local", &self.local)
            .finish()
    }
}

impl RouterSocket {
    /// Listens on `endpoint`. Needs a tokio runtime.
    pub async fn bind(
        endpoint: &str,
        limits: Limits,
        stats: Arc<TransportStats>,
    ) -> Result<Self, ZmqError> {
        let listener = listen(endpoint).await?;
        let local = listener.local_addr().map_err(|source| ZmqError::Io {
            endpoint: endpoint.to_string(),
            source,
        })?;
        let (in_tx, rx) = mpsc::channel(limits.recv_queue.max(1));
        let shared = Arc::new(RouterShared {
            limits: limits.clone(),
            stats: stats.clone(),
            peers: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(0x6b8b_4567),
        });
        let s = shared.clone();
        let acceptor = spawn_acceptor(listener, SocketType::Router, limits, stats, move |c| {
            run_router_conn(s.clone(), c, in_tx.clone())
        });
        Ok(Self {
            shared,
            rx,
            local,
            _tasks: Tasks(vec![acceptor]),
        })
    }

    /// The bound endpoint with the real port.
    pub fn endpoint(&self) -> String {
        endpoint_of(self.local)
    }

    /// The next message: `[identity, frames...]`.
    pub async fn recv(&mut self) -> Result<Vec<Bytes>, ZmqError> {
        self.rx.recv().await.ok_or(ZmqError::Closed)
    }

    /// Sends `frames[1..]` to the peer whose identity is `frames[0]`.
    pub async fn send(&self, frames: &[Bytes]) -> Result<(), ZmqError> {
        let [identity, rest @ ..] = frames else {
            return Err(ZmqError::EmptyMessage);
        };
        if rest.is_empty() {
            return Err(ZmqError::EmptyMessage);
        }
        let Some(tx) = self.shared.peers.lock().get(identity).cloned() else {
            return Err(ZmqError::UnknownPeer);
        };
        tx.send(codec::encode_message_parts(rest))
            .await
            .map_err(|_| ZmqError::Closed)
    }

    /// Peers currently connected.
    pub fn peer_count(&self) -> usize {
        self.shared.peers.lock().len()
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<TransportStats> {
        &self.shared.stats
    }
}

// ---------------------------------------------------------------------------------------
// DEALER

/// A DEALER connected to one peer (a ROUTER, usually). [`Self::recv`] fails with
/// [`ZmqError::Closed`] once the connection ends.
pub struct DealerSocket {
    tx: mpsc::Sender<Vec<Bytes>>,
    rx: mpsc::Receiver<Vec<Bytes>>,
    _tasks: Tasks,
}

impl std::fmt::Debug for DealerSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DealerSocket").finish()
    }
}

impl DealerSocket {
    /// Dials `endpoint` and completes the handshake. Needs a tokio runtime.
    pub async fn connect(
        endpoint: &str,
        limits: Limits,
        stats: Arc<TransportStats>,
    ) -> Result<Self, ZmqError> {
        let conn = dial_and_handshake(endpoint, SocketType::Dealer, &limits, &stats).await?;
        let (in_tx, rx) = mpsc::channel(limits.recv_queue.max(1));
        let (tx, out_rx) = mpsc::channel(limits.send_queue.max(1));
        let task = tokio::spawn(async move {
            let peer = conn.peer.addr;
            let end = conn::drive(
                conn,
                out_rx,
                ForwardHandler {
                    identity: None,
                    inbound: in_tx,
                },
            )
            .await;
            report_end(end, peer, &stats);
        });
        Ok(Self {
            tx,
            rx,
            _tasks: Tasks(vec![task]),
        })
    }

    /// Sends one message (waits while the send queue is full).
    pub async fn send(&self, frames: &[Bytes]) -> Result<(), ZmqError> {
        if frames.is_empty() {
            return Err(ZmqError::EmptyMessage);
        }
        self.tx
            .send(codec::encode_message_parts(frames))
            .await
            .map_err(|_| ZmqError::Closed)
    }

    /// The next message.
    pub async fn recv(&mut self) -> Result<Vec<Bytes>, ZmqError> {
        self.rx.recv().await.ok_or(ZmqError::Closed)
    }
}
