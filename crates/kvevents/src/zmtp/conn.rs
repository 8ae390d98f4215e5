//! One ZMTP connection: the handshake (greeting + NULL READY exchange, under a deadline) and
//! the driver that reads frames and writes queued messages until either side ends.

use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use super::codec::{
    self, Command, Decoded, Decoder, GREETING_LEN, PeerGreeting, SIGNATURE_LEN, check_signature,
};
use super::{ErrorReason, Limits, SocketType, TransportError};

/// Bytes read from the socket per read call at most (and the write batch size).
const CHUNK: usize = 64 << 10;
/// Buffers passed to one vectored write at most.
const MAX_IOV: usize = 64;

/// A connection whose handshake completed.
pub(crate) struct Conn {
    pub stream: TcpStream,
    /// Bytes received after the peer's READY (already the start of its traffic).
    pub buf: BytesMut,
    pub decoder: Decoder,
    pub peer: PeerInfo,
}

/// What the handshake told us about the peer.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    pub addr: Option<SocketAddr>,
    pub socket_type: SocketType,
    pub identity: Bytes,
    pub greeting: PeerGreeting,
}

/// How a handshake failed.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// A protocol violation, limit or timeout: counted.
    Protocol(TransportError),
    /// The peer connected and left without a byte (a TCP probe, a port scan): not counted.
    Silent,
    /// An I/O error (reset...).
    Io(std::io::Error),
}

impl From<TransportError> for HandshakeError {
    fn from(e: TransportError) -> Self {
        HandshakeError::Protocol(e)
    }
}

/// Reads until `buf` holds at least `n` bytes (`total_seen` counts the bytes received).
async fn fill(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    n: usize,
    total_seen: &mut usize,
) -> Result<(), HandshakeError> {
    while buf.len() < n {
        buf.reserve((n - buf.len()).clamp(512, CHUNK));
        // A peer leaving mid-handshake usually resets (it had our greeting unread), so an
        // error counts like an end of stream.
        let (read, how) = match stream.read_buf(buf).await {
            Ok(n) => (n, "closed".to_string()),
            Err(e) if *total_seen == 0 => return Err(HandshakeError::Io(e)),
            Err(e) => (0, format!("lost ({e})")),
        };
        if read == 0 {
            return Err(if *total_seen == 0 {
                HandshakeError::Silent
            } else if *total_seen < GREETING_LEN {
                HandshakeError::Protocol(TransportError::new(
                    ErrorReason::BadGreeting,
                    format!("connection {how} after {total_seen} bytes of the greeting"),
                ))
            } else {
                HandshakeError::Protocol(TransportError::new(
                    ErrorReason::HandshakeFailed,
                    format!("connection {how} during the handshake"),
                ))
            });
        }
        *total_seen += read;
    }
    Ok(())
}

/// Runs the ZMTP 3.x NULL handshake on `stream` as a socket of type `ours`, within
/// `limits.handshake_timeout`.
pub(crate) async fn handshake(
    stream: TcpStream,
    ours: SocketType,
    identity: &[u8],
    limits: &Limits,
) -> Result<Conn, HandshakeError> {
    match tokio::time::timeout(
        limits.handshake_timeout,
        handshake_inner(stream, ours, identity, limits),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Protocol(TransportError::new(
            ErrorReason::HandshakeTimeout,
            format!(
                "handshake not completed within {:?}",
                limits.handshake_timeout
            ),
        ))),
    }
}

async fn handshake_inner(
    mut stream: TcpStream,
    ours: SocketType,
    identity: &[u8],
    limits: &Limits,
) -> Result<Conn, HandshakeError> {
    let addr = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    // Both sides send their whole greeting at once; libzmq sends its own in steps as ours
    // arrives, so never wait for the peer's before sending.
    stream
        .write_all(&codec::greeting())
        .await
        .map_err(HandshakeError::Io)?;
    let mut buf = BytesMut::with_capacity(512);
    let mut seen = 0;
    fill(&mut stream, &mut buf, SIGNATURE_LEN, &mut seen).await?;
    // Reject non-ZMTP peers (an HTTP request...) as soon as the signature is wrong.
    check_signature(&buf[..SIGNATURE_LEN])?;
    fill(&mut stream, &mut buf, GREETING_LEN, &mut seen).await?;
    let greeting = codec::parse_greeting(&buf.split_to(GREETING_LEN))?;

    let mut out = BytesMut::new();
    codec::encode_ready(ours, identity, &mut out);
    stream.write_all(&out).await.map_err(HandshakeError::Io)?;

    let mut decoder = Decoder::new(limits);
    let ready = loop {
        if let Some(item) = decoder.decode(&mut buf)? {
            break item;
        }
        let want = decoder.wanted(&buf);
        fill(&mut stream, &mut buf, want, &mut seen).await?;
    };
    let cmd = match ready {
        Decoded::Command(c) => c,
        Decoded::Message(_) => {
            return Err(TransportError::new(
                ErrorReason::Protocol,
                "message before the READY command",
            )
            .into());
        }
    };
    if cmd.name.as_ref() == b"ERROR" {
        return Err(TransportError::new(
            ErrorReason::HandshakeFailed,
            format!("peer refused: {}", codec::error_reason(&cmd.data)),
        )
        .into());
    }
    if cmd.name.as_ref() != b"READY" {
        return Err(TransportError::new(
            ErrorReason::Protocol,
            format!(
                "{:?} command before READY",
                String::from_utf8_lossy(&cmd.name)
            ),
        )
        .into());
    }
    let meta = codec::parse_ready(&cmd.data)?;
    let Some(socket_type) = meta.socket_type else {
        return Err(TransportError::new(ErrorReason::Protocol, "READY without Socket-Type").into());
    };
    if !ours.accepts(socket_type) {
        // Tell the peer why, as libzmq does, then close.
        let mut out = BytesMut::new();
        codec::encode_error("Invalid socket type", &mut out);
        let _ = stream.write_all(&out).await;
        return Err(TransportError::new(
            ErrorReason::SocketType,
            format!(
                "a {} socket cannot talk to a {} peer",
                ours.name(),
                socket_type.name()
            ),
        )
        .into());
    }
    Ok(Conn {
        stream,
        buf,
        decoder,
        peer: PeerInfo {
            addr,
            socket_type,
            identity: meta.identity,
            greeting,
        },
    })
}

/// What the driver does with what a peer sends.
pub(crate) trait Handler: Send {
    /// A whole message arrived; `Ok(false)` ends the connection (the socket is gone), an
    /// error ends it as a protocol violation.
    fn message(
        &mut self,
        frames: Vec<Bytes>,
    ) -> impl std::future::Future<Output = Result<bool, TransportError>> + Send;
    /// A command other than PING/PONG arrived.
    fn command(&mut self, cmd: &Command) -> Result<(), TransportError>;
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The peer closed it, or our side let it go.
    Closed,
    /// The peer broke the protocol or a limit.
    Protocol(TransportError),
    /// An I/O error.
    Io(std::io::Error),
}

/// Runs the connection: frames from the peer go to `handler`; encoded messages from `out`
/// are written (several at a time when queued). Ends when the peer closes, breaks the
/// protocol, `out` is closed or the handler declines a message.
pub(crate) async fn drive<H: Handler>(
    conn: Conn,
    out: mpsc::Receiver<Vec<Bytes>>,
    handler: H,
) -> End {
    let Conn {
        stream,
        buf,
        decoder,
        peer: _,
    } = conn;
    let (rd, wr) = stream.into_split();
    let (pong_tx, pong_rx) = mpsc::channel(4);
    tokio::select! {
        end = read_loop(rd, buf, decoder, handler, pong_tx) => end,
        end = write_loop(wr, out, pong_rx) => end,
    }
}

async fn read_loop<H: Handler>(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    mut decoder: Decoder,
    mut handler: H,
    pong: mpsc::Sender<Vec<Bytes>>,
) -> End {
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Decoded::Message(frames))) => match handler.message(frames).await {
                    Ok(true) => {}
                    Ok(false) => return End::Closed,
                    Err(e) => return End::Protocol(e),
                },
                Ok(Some(Decoded::Command(cmd))) => match cmd.name.as_ref() {
                    b"PING" => {
                        // PING: TTL (2 bytes) + context (0..16 bytes), answered by PONG +
                        // context. A full pong queue means the peer is not reading: skip.
                        let ctx = cmd.data.get(2..).unwrap_or_default();
                        let ctx = &ctx[..ctx.len().min(16)];
                        let mut out = BytesMut::new();
                        codec::encode_command(b"PONG", ctx, &mut out);
                        let _ = pong.try_send(vec![out.freeze()]);
                    }
                    b"PONG" => {}
                    b"ERROR" => {
                        return End::Protocol(TransportError::new(
                            ErrorReason::Protocol,
                            format!("peer error: {}", codec::error_reason(&cmd.data)),
                        ));
                    }
                    _ => {
                        if let Err(e) = handler.command(&cmd) {
                            return End::Protocol(e);
                        }
                    }
                },
                Ok(None) => break,
                Err(e) => return End::Protocol(e),
            }
        }
        // Read in large chunks (fewer syscalls), but grow only with what arrives: never by
        // a size a frame header announced, at most one chunk beyond what is buffered (the
        // buffer doubles while a large frame arrives, bounded by the frame cap).
        buf.reserve(CHUNK);
        match rd.read_buf(&mut buf).await {
            Ok(0) => return End::Closed,
            Ok(_) => {}
            Err(e) => return End::Io(e),
        }
    }
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut out: mpsc::Receiver<Vec<Bytes>>,
    mut pong: mpsc::Receiver<Vec<Bytes>>,
) -> End {
    let mut queued: Vec<Bytes> = Vec::with_capacity(MAX_IOV);
    loop {
        let first = tokio::select! {
            m = out.recv() => match m {
                Some(m) => m,
                None => {
                    let _ = wr.shutdown().await;
                    return End::Closed;
                }
            },
            Some(p) = pong.recv() => p,
        };
        // Coalesce what is already queued into one vectored write, without copying.
        queued.clear();
        let mut size: usize = first.iter().map(Bytes::len).sum();
        queued.extend(first);
        while queued.len() < MAX_IOV && size < CHUNK {
            match out.try_recv() {
                Ok(m) => {
                    size += m.iter().map(Bytes::len).sum::<usize>();
                    queued.extend(m);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = write_all_vectored(&mut wr, &mut queued).await {
            return End::Io(e);
        }
    }
}

/// Writes every buffer of `bufs` (consuming them) with vectored writes.
async fn write_all_vectored(wr: &mut OwnedWriteHalf, bufs: &mut [Bytes]) -> std::io::Result<()> {
    let mut first = 0;
    while first < bufs.len() {
        let mut slices = [std::io::IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        for (slot, b) in slices.iter_mut().zip(&bufs[first..]) {
            *slot = std::io::IoSlice::new(b);
            count += 1;
        }
        let mut n = wr.write_vectored(&slices[..count]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && first < bufs.len() {
            let len = bufs[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                bufs[first].advance(n);
                n = 0;
            }
        }
        while first < bufs.len() && bufs[first].is_empty() {
            first += 1;
        }
    }
    Ok(())
}
