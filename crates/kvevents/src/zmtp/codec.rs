//! ZMTP 3.x framing without I/O: the greeting, frames, commands and NULL-mechanism metadata.
//!
//! Everything here works on byte buffers, so it can be tested (and property-tested) without
//! sockets. The decoder never allocates more than the bytes it was given: a frame header
//! announcing more than [`Limits::max_frame_bytes`] is rejected before anything is reserved.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{ErrorReason, Limits, SocketType, TransportError};

/// Length of a ZMTP 3.x greeting.
pub const GREETING_LEN: usize = 64;
/// Length of the signature that opens a greeting (`0xFF`, 8 padding bytes, `0x7F`).
pub const SIGNATURE_LEN: usize = 10;
/// The minor version we announce (ZMTP 3.1, as libzmq 4.2+ does).
pub const OUR_MINOR: u8 = 1;

const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;
const FLAGS_RESERVED: u8 = 0xF8;

/// Our greeting: signature, version 3.1, mechanism `NULL`, as-server 0, zero filler.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xFF;
    // Padding: libzmq writes (identity length + 1) here for ZMTP 1.0 peers; any value is valid.
    g[8] = 0x01;
    g[9] = 0x7F;
    g[10] = 3;
    g[11] = OUR_MINOR;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Checks the first [`SIGNATURE_LEN`] bytes of a peer's greeting.
pub fn check_signature(sig: &[u8]) -> Result<(), TransportError> {
    if sig.len() < SIGNATURE_LEN || sig[0] != 0xFF || sig[9] & 0x01 != 0x01 {
        return Err(TransportError::new(
            ErrorReason::BadGreeting,
            "not a ZMTP 3.x greeting signature",
        ));
    }
    Ok(())
}

/// What we learn from a peer's greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerGreeting {
    /// The peer's minor version (0 = ZMTP 3.0, 1 = 3.1, higher accepted as 3.1).
    pub minor: u8,
}

impl PeerGreeting {
    /// Whether subscriptions travel as SUBSCRIBE/CANCEL commands (3.1) rather than
    /// messages prefixed with 0x01/0x00 (3.0).
    pub fn uses_subscribe_commands(&self) -> bool {
        self.minor.min(OUR_MINOR) >= 1
    }
}

/// Parses a peer's full greeting: ZMTP 3.x with the NULL mechanism.
pub fn parse_greeting(g: &[u8]) -> Result<PeerGreeting, TransportError> {
    check_signature(g)?;
    if g.len() < GREETING_LEN {
        return Err(TransportError::new(
            ErrorReason::BadGreeting,
            format!("greeting of {} bytes, expected {GREETING_LEN}", g.len()),
        ));
    }
    if g[10] < 3 {
        return Err(TransportError::new(
            ErrorReason::UnsupportedVersion,
            format!("ZMTP {}.{} peer; 3.0 or later is required", g[10], g[11]),
        ));
    }
    let mechanism = &g[12..32];
    let name_len = mechanism.iter().position(|&b| b == 0).unwrap_or(20);
    if &mechanism[..name_len] != b"NULL" || mechanism[name_len..].iter().any(|&b| b != 0) {
        let shown = String::from_utf8_lossy(&mechanism[..name_len]).into_owned();
        return Err(TransportError::new(
            ErrorReason::BadMechanism,
            format!("security mechanism {shown:?}; only NULL is supported"),
        ));
    }
    // A peer with a higher major version must still speak 3.x to a 3.x peer (ZMTP's rule).
    let minor = if g[10] > 3 { OUR_MINOR } else { g[11] };
    Ok(PeerGreeting { minor })
}

/// One decoded unit: a whole multipart message or a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A complete multipart message (at least one frame).
    Message(Vec<Bytes>),
    /// A command frame: its name and data.
    Command(Command),
}

/// A ZMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The command name (`READY`, `ERROR`, `SUBSCRIBE`, `CANCEL`, `PING`, `PONG`...).
    pub name: Bytes,
    /// The bytes after the name.
    pub data: Bytes,
}

/// Incremental frame decoder with hard caps (see [`Limits`]).
#[derive(Debug)]
pub struct Decoder {
    max_frame: usize,
    max_message: usize,
    max_frames: usize,
    max_command: usize,
    frames: Vec<Bytes>,
    message_bytes: usize,
}

impl Decoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            max_frame: limits.max_frame_bytes,
            max_message: limits.max_message_bytes,
            max_frames: limits.max_frames.max(1),
            max_command: limits.max_command_bytes,
            frames: Vec::new(),
            message_bytes: 0,
        }
    }

    /// Decodes the next complete message or command from the front of `buf`, consuming its
    /// bytes. `Ok(None)` means more bytes are needed; [`Self::wanted`] tells how many at
    /// least. Errors are final: the connection must be closed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, TransportError> {
        loop {
            let Some(&flags) = buf.first() else {
                return Ok(None);
            };
            if flags & FLAGS_RESERVED != 0 {
                return Err(TransportError::new(
                    ErrorReason::Protocol,
                    format!("frame flags {flags:#04x} use reserved bits"),
                ));
            }
            let command = flags & FLAG_COMMAND != 0;
            let more = flags & FLAG_MORE != 0;
            let header = if flags & FLAG_LONG != 0 { 9 } else { 2 };
            if buf.len() < header {
                return Ok(None);
            }
            let size = if header == 9 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[1..9]);
                u64::from_be_bytes(b)
            } else {
                u64::from(buf[1])
            };
            if command {
                if more {
                    return Err(TransportError::new(
                        ErrorReason::Protocol,
                        "command frame with the MORE flag",
                    ));
                }
                if !self.frames.is_empty() {
                    return Err(TransportError::new(
                        ErrorReason::Protocol,
                        "command frame inside a multipart message",
                    ));
                }
                if size > self.max_command as u64 {
                    return Err(TransportError::new(
                        ErrorReason::CommandTooLarge,
                        format!("command of {size} bytes (limit {} bytes)", self.max_command),
                    ));
                }
            } else {
                if size > self.max_frame as u64 {
                    return Err(TransportError::new(
                        ErrorReason::FrameTooLarge,
                        format!("frame of {size} bytes (limit {} bytes)", self.max_frame),
                    ));
                }
                if self.frames.len() >= self.max_frames {
                    return Err(TransportError::new(
                        ErrorReason::TooManyFrames,
                        format!("message of more than {} frames", self.max_frames),
                    ));
                }
                if self.message_bytes as u64 + size > self.max_message as u64 {
                    return Err(TransportError::new(
                        ErrorReason::MessageTooLarge,
                        format!(
                            "message of more than {} bytes (limit {} bytes)",
                            self.message_bytes as u64 + size,
                            self.max_message
                        ),
                    ));
                }
            }
            // Bounded by the caps above, so it fits usize.
            let size = size as usize;
            if buf.len() < header + size {
                return Ok(None);
            }
            buf.advance(header);
            let body = buf.split_to(size).freeze();
            if command {
                return parse_command(body).map(|c| Some(Decoded::Command(c)));
            }
            self.message_bytes += size;
            self.frames.push(body);
            if !more {
                self.message_bytes = 0;
                return Ok(Some(Decoded::Message(std::mem::take(&mut self.frames))));
            }
        }
    }

    /// The least number of buffered bytes `buf` must reach before [`Self::decode`] can make
    /// progress (a frame header, or the whole current frame). Bounded by the caps.
    pub fn wanted(&self, buf: &[u8]) -> usize {
        let Some(&flags) = buf.first() else {
            return 2;
        };
        let header = if flags & FLAG_LONG != 0 { 9 } else { 2 };
        if buf.len() < header {
            return header;
        }
        let size = if header == 9 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[1..9]);
            u64::from_be_bytes(b)
        } else {
            u64::from(buf[1])
        };
        let cap = self.max_frame.max(self.max_command) as u64;
        header + size.min(cap) as usize
    }
}

fn parse_command(mut body: Bytes) -> Result<Command, TransportError> {
    let Some(&len) = body.first() else {
        return Err(TransportError::new(ErrorReason::Protocol, "empty command"));
    };
    let len = usize::from(len);
    if len == 0 || body.len() < 1 + len {
        return Err(TransportError::new(
            ErrorReason::Protocol,
            "command name longer than the command",
        ));
    }
    body.advance(1);
    let name = body.split_to(len);
    Ok(Command { name, data: body })
}

fn put_header(out: &mut BytesMut, flags: u8, len: usize) {
    if len > 255 {
        out.put_u8(flags | FLAG_LONG);
        out.put_u64(len as u64);
    } else {
        out.put_u8(flags);
        out.put_u8(len as u8);
    }
}

/// Appends the frames of one multipart message (short frames up to 255 bytes, long above).
pub fn encode_message<B: AsRef<[u8]>>(frames: &[B], out: &mut BytesMut) {
    let total: usize = frames.iter().map(|f| f.as_ref().len() + 9).sum();
    out.reserve(total);
    let last = frames.len().saturating_sub(1);
    for (i, f) in frames.iter().enumerate() {
        let f = f.as_ref();
        put_header(out, if i < last { FLAG_MORE } else { 0 }, f.len());
        out.put_slice(f);
    }
}

/// Frames up to this size are copied next to the headers; larger ones are sent from their
/// own buffer (no copy).
const COPY_MAX: usize = 512;

/// One multipart message ready for a vectored write: the frame headers, with small frames
/// copied in between, and large frames shared (not copied).
pub fn encode_message_parts(frames: &[Bytes]) -> Vec<Bytes> {
    let mut parts = Vec::with_capacity(2);
    let inline: usize = frames
        .iter()
        .map(|f| 9 + if f.len() <= COPY_MAX { f.len() } else { 0 })
        .sum();
    let mut scratch = BytesMut::with_capacity(inline);
    let last = frames.len().saturating_sub(1);
    for (i, f) in frames.iter().enumerate() {
        put_header(&mut scratch, if i < last { FLAG_MORE } else { 0 }, f.len());
        if f.len() <= COPY_MAX {
            scratch.put_slice(f);
        } else {
            parts.push(scratch.split().freeze());
            parts.push(f.clone());
        }
    }
    if !scratch.is_empty() {
        parts.push(scratch.freeze());
    }
    parts
}

/// Appends one command frame.
pub fn encode_command(name: &[u8], data: &[u8], out: &mut BytesMut) {
    let name = &name[..name.len().min(255)];
    put_header(out, FLAG_COMMAND, 1 + name.len() + data.len());
    out.put_u8(name.len() as u8);
    out.put_slice(name);
    out.put_slice(data);
}

/// The READY command of the NULL mechanism, announcing `socket_type` (and `identity` when
/// not empty).
pub fn encode_ready(socket_type: SocketType, identity: &[u8], out: &mut BytesMut) {
    let mut props = BytesMut::new();
    put_property(&mut props, b"Socket-Type", socket_type.name().as_bytes());
    if !identity.is_empty() {
        put_property(&mut props, b"Identity", identity);
    }
    encode_command(b"READY", &props, out);
}

fn put_property(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(name.len() as u8);
    out.put_slice(name);
    out.put_u32(value.len() as u32);
    out.put_slice(value);
}

/// Metadata of a READY command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// `Socket-Type`.
    pub socket_type: Option<SocketType>,
    /// `Identity` (empty when absent).
    pub identity: Bytes,
}

/// Parses a READY command's properties (`name-len, name, value-len (4 bytes BE), value`...).
pub fn parse_ready(data: &Bytes) -> Result<Metadata, TransportError> {
    let bad = |what: String| TransportError::new(ErrorReason::Protocol, what);
    let mut meta = Metadata::default();
    let mut rest = data.clone();
    let mut socket_type_seen = false;
    while !rest.is_empty() {
        let name_len = usize::from(rest[0]);
        if name_len == 0 || rest.len() < 1 + name_len + 4 {
            return Err(bad("truncated READY property".into()));
        }
        rest.advance(1);
        let name = rest.split_to(name_len);
        let value_len = rest.get_u32() as usize;
        if rest.len() < value_len {
            return Err(bad("READY property value longer than the command".into()));
        }
        let value = rest.split_to(value_len);
        if name.eq_ignore_ascii_case(b"Socket-Type") {
            socket_type_seen = true;
            meta.socket_type = SocketType::from_name(&value);
            if meta.socket_type.is_none() {
                return Err(TransportError::new(
                    ErrorReason::SocketType,
                    format!(
                        "unknown socket type {:?}",
                        String::from_utf8_lossy(&value[..value.len().min(32)])
                    ),
                ));
            }
        } else if name.eq_ignore_ascii_case(b"Identity") {
            if value.len() > 255 {
                return Err(bad(format!("identity of {} bytes", value.len())));
            }
            meta.identity = value;
        }
    }
    if !socket_type_seen {
        return Err(bad("READY without Socket-Type".into()));
    }
    Ok(meta)
}

/// The reason of an ERROR command (lossy UTF-8, at most 255 bytes).
pub fn error_reason(data: &Bytes) -> String {
    let n = data.first().map_or(0, |&n| usize::from(n));
    let reason = data.get(1..(1 + n).min(data.len())).unwrap_or_default();
    String::from_utf8_lossy(reason).into_owned()
}

/// An ERROR command carrying `reason`.
pub fn encode_error(reason: &str, out: &mut BytesMut) {
    let r = &reason.as_bytes()[..reason.len().min(255)];
    let mut data = BytesMut::with_capacity(1 + r.len());
    data.put_u8(r.len() as u8);
    data.put_slice(r);
    encode_command(b"ERROR", &data, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_frame_bytes: 1000,
            max_message_bytes: 1500,
            max_frames: 4,
            max_command_bytes: 300,
            ..Limits::default()
        }
    }

    fn decode_all(bytes: &[u8], limits: &Limits) -> Result<Vec<Decoded>, TransportError> {
        let mut d = Decoder::new(limits);
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(x) = d.decode(&mut buf)? {
            out.push(x);
        }
        Ok(out)
    }

    #[test]
    fn greeting_layout_is_zmtp_3_1_null() {
        let g = greeting();
        assert_eq!(g.len(), 64);
        assert_eq!((g[0], g[9], g[10], g[11]), (0xFF, 0x7F, 3, 1));
        assert_eq!(&g[12..20], b"NULL\0\0\0\0");
        assert_eq!(g[32], 0, "as-server is 0 for NULL");
        assert!(g[33..].iter().all(|&b| b == 0));
        assert_eq!(parse_greeting(&g), Ok(PeerGreeting { minor: 1 }));
    }

    #[test]
    fn greeting_versions_and_mechanisms() {
        let mut g = greeting();
        g[11] = 0;
        let p = parse_greeting(&g).unwrap();
        assert!(!p.uses_subscribe_commands(), "3.0 peers get 0x01 messages");
        g[11] = 7;
        assert!(parse_greeting(&g).unwrap().uses_subscribe_commands());
        g[10] = 4;
        assert_eq!(parse_greeting(&g).unwrap().minor, OUR_MINOR);
        g[10] = 2;
        assert_eq!(
            parse_greeting(&g).unwrap_err().reason,
            ErrorReason::UnsupportedVersion
        );
        let mut g = greeting();
        g[12..17].copy_from_slice(b"PLAIN");
        assert_eq!(
            parse_greeting(&g).unwrap_err().reason,
            ErrorReason::BadMechanism
        );
        let mut g = greeting();
        g[12..18].copy_from_slice(b"NULLXX");
        assert_eq!(
            parse_greeting(&g).unwrap_err().reason,
            ErrorReason::BadMechanism
        );
        assert_eq!(
            check_signature(b"GET / HTTP").unwrap_err().reason,
            ErrorReason::BadGreeting
        );
        assert_eq!(
            parse_greeting(&greeting()[..40]).unwrap_err().reason,
            ErrorReason::BadGreeting
        );
    }

    #[test]
    fn messages_round_trip_with_short_and_long_frames() {
        let frames = vec![
            Bytes::from_static(b"kv@topic"),
            Bytes::new(),
            Bytes::from(vec![7u8; 255]),
            Bytes::from(vec![9u8; 256]),
        ];
        let mut out = BytesMut::new();
        encode_message(&frames, &mut out);
        // 255 bytes still fit a short frame; 256 need a long one.
        assert_eq!(out.len(), (2 + 8) + 2 + (2 + 255) + (9 + 256));
        let got = decode_all(&out, &limits()).unwrap();
        assert_eq!(got, vec![Decoded::Message(frames)]);
    }

    #[test]
    fn parts_encode_like_a_flat_message() {
        let frames = vec![
            Bytes::from_static(b"kv@topic"),
            Bytes::from(vec![1u8; 8]),
            Bytes::from(vec![7u8; 3000]),
            Bytes::from(vec![9u8; 100]),
        ];
        let parts = encode_message_parts(&frames);
        assert_eq!(
            parts.len(),
            3,
            "headers+small, the large frame, header+small"
        );
        let flat: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let mut want = BytesMut::new();
        encode_message(&frames, &mut want);
        assert_eq!(flat, want.to_vec());
    }

    #[test]
    fn long_form_is_accepted_for_small_frames() {
        let bytes = [0x02, 0, 0, 0, 0, 0, 0, 0, 3, b'a', b'b', b'c'];
        assert_eq!(
            decode_all(&bytes, &limits()).unwrap(),
            vec![Decoded::Message(vec![Bytes::from_static(b"abc")])]
        );
    }

    #[test]
    fn byte_by_byte_feeding_decodes_the_same() {
        let mut out = BytesMut::new();
        encode_command(b"SUBSCRIBE", b"kv@", &mut out);
        encode_message(&[&b"a"[..], &[5u8; 300][..], b"c"], &mut out);
        let mut d = Decoder::new(&limits());
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &b in out.iter() {
            buf.put_u8(b);
            assert!(d.wanted(&buf) >= 1);
            while let Some(x) = d.decode(&mut buf).unwrap() {
                got.push(x);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            Decoded::Command(Command {
                name: Bytes::from_static(b"SUBSCRIBE"),
                data: Bytes::from_static(b"kv@")
            })
        );
    }

    #[test]
    fn hostile_headers_are_rejected_before_any_allocation() {
        // The frame: long flag, 2^62 bytes announced.
        let mut bytes = vec![0x02];
        bytes.extend_from_slice(&(1u64 << 62).to_be_bytes());
        let e = decode_all(&bytes, &limits()).unwrap_err();
        assert_eq!(e.reason, ErrorReason::FrameTooLarge);
        let mut bytes = vec![0x06];
        bytes.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(
            decode_all(&bytes, &limits()).unwrap_err().reason,
            ErrorReason::CommandTooLarge
        );
        // wanted() never asks for more than the cap.
        let d = Decoder::new(&limits());
        let mut hdr = vec![0x02];
        hdr.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(d.wanted(&hdr) <= 9 + 1000);
    }

    #[test]
    fn message_caps() {
        let l = limits();
        let five: Vec<&[u8]> = vec![b"a"; 5];
        let mut out = BytesMut::new();
        encode_message(&five, &mut out);
        assert_eq!(
            decode_all(&out, &l).unwrap_err().reason,
            ErrorReason::TooManyFrames
        );
        let mut out = BytesMut::new();
        encode_message(&[vec![0u8; 800], vec![0u8; 800]], &mut out);
        assert_eq!(
            decode_all(&out, &l).unwrap_err().reason,
            ErrorReason::MessageTooLarge
        );
        // Caps are per message: two messages of 800 bytes are fine.
        let mut out = BytesMut::new();
        encode_message(&[vec![0u8; 800]], &mut out);
        encode_message(&[vec![0u8; 800]], &mut out);
        assert_eq!(decode_all(&out, &l).unwrap().len(), 2);
    }

    #[test]
    fn protocol_violations() {
        let l = limits();
        for bytes in [
            &[0x08u8, 0][..],                       // reserved flag bit
            &[0x05, 1, 1, b'X'][..],                // command with MORE
            &[0x04, 0][..],                         // empty command
            &[0x04, 2, 5, b'X'][..],                // name longer than the command
            &[0x01, 1, b'a', 0x04, 2, 1, b'X'][..], // command inside a message
        ] {
            assert_eq!(
                decode_all(bytes, &l).unwrap_err().reason,
                ErrorReason::Protocol,
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn ready_metadata() {
        let mut out = BytesMut::new();
        encode_ready(SocketType::Dealer, b"me", &mut out);
        let Decoded::Command(c) = decode_all(&out, &limits()).unwrap().remove(0) else {
            panic!("expected a command");
        };
        assert_eq!(&c.name[..], b"READY");
        let m = parse_ready(&c.data).unwrap();
        assert_eq!(m.socket_type, Some(SocketType::Dealer));
        assert_eq!(&m.identity[..], b"me");
        // Unknown properties are skipped; names are case-insensitive.
        let mut props = BytesMut::new();
        put_property(&mut props, b"X-Custom", b"whatever");
        put_property(&mut props, b"socket-type", b"PUB");
        assert_eq!(
            parse_ready(&props.freeze()).unwrap().socket_type,
            Some(SocketType::Pub)
        );
        // Truncated or lying lengths are errors.
        let mut props = BytesMut::new();
        props.put_u8(11);
        props.put_slice(b"Socket-Type");
        props.put_u32(u32::MAX);
        props.put_slice(b"PUB");
        assert!(parse_ready(&props.freeze()).is_err());
        assert!(parse_ready(&Bytes::from_static(b"\x05ab")).is_err());
        assert!(
            parse_ready(&Bytes::new()).is_err(),
            "Socket-Type is required"
        );
        let mut props = BytesMut::new();
        put_property(&mut props, b"Socket-Type", b"BOGUS");
        assert_eq!(
            parse_ready(&props.freeze()).unwrap_err().reason,
            ErrorReason::SocketType
        );
    }

    #[test]
    fn error_command() {
        let mut out = BytesMut::new();
        encode_error("no thanks", &mut out);
        let Decoded::Command(c) = decode_all(&out, &limits()).unwrap().remove(0) else {
            panic!("expected a command");
        };
        assert_eq!(&c.name[..], b"ERROR");
        assert_eq!(error_reason(&c.data), "no thanks");
        assert_eq!(error_reason(&Bytes::from_static(b"\x09ab")), "ab");
    }
}
