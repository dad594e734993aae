//! A WebSocket stream from the API server, masked message by message: a watch (each
//! message one event) or a log follow (each message a chunk of the log) sent as an
//! HTTP/1.1 WebSocket upgrade. The server's frames are parsed (RFC 6455), each
//! message's payload decoded as the negotiated subprotocol says, masked by the same
//! streaming maskers as a plain response (JSON event by event, text line by line;
//! one masker per channel), encoded again and sent as one unmasked frame per message.
//!
//! Subprotocols (`k8s.io/streaming/pkg/httpstream/wsstream`): none, `binary.k8s.io`
//! (raw bytes), `base64.binary.k8s.io` (base64 text), `channel.k8s.io` and
//! `v4`/`v5.channel.k8s.io` (a channel byte, then raw bytes), `base64.channel.k8s.io`
//! and its versions (a channel digit, then base64). Anything else, a compressed frame
//! (an extension's RSV bit), or a message larger than [`MAX_MESSAGE`] is an error: the
//! stream ends, nothing unmasked passes.
use std::sync::Arc;

use base64::Engine;

use super::{Detectors, JsonMasker, MAX_STRING, MaskError, Plan, TextMasker};

/// Largest message held while it is masked.
pub const MAX_MESSAGE: usize = MAX_STRING;

/// What a stream's messages carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsContent {
    /// JSON documents (watch events).
    Json,
    /// Text (a log).
    Text,
}

/// How a message's payload is framed, from the subprotocol the server chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsCodec {
    Raw,
    Base64,
    Channel,
    Base64Channel,
}

impl WsCodec {
    /// The framing of a subprotocol; `None` for one this build does not know.
    pub fn from_protocol(p: &str) -> Option<WsCodec> {
        let p = p.trim();
        Some(match p {
            "" | "binary.k8s.io" => WsCodec::Raw,
            "base64.binary.k8s.io" => WsCodec::Base64,
            "channel.k8s.io" => WsCodec::Channel,
            "base64.channel.k8s.io" => WsCodec::Base64Channel,
            _ => {
                // vN.channel.k8s.io, vN.base64.channel.k8s.io
                let rest = p.strip_prefix('v')?;
                let dot = rest.find('.')?;
                if !rest[..dot].bytes().all(|b| b.is_ascii_digit()) || dot == 0 {
                    return None;
                }
                match &rest[dot..] {
                    ".channel.k8s.io" => WsCodec::Channel,
                    ".base64.channel.k8s.io" => WsCodec::Base64Channel,
                    _ => return None,
                }
            }
        })
    }

    fn channels(self) -> bool {
        matches!(self, WsCodec::Channel | WsCodec::Base64Channel)
    }

    fn base64(self) -> bool {
        matches!(self, WsCodec::Base64 | WsCodec::Base64Channel)
    }
}

/// One channel's masker.
enum ChannelMasker {
    Json(JsonMasker),
    Text(TextMasker),
    /// Text without detectors: as a plain log response, passed.
    Pass,
}

impl ChannelMasker {
    fn feed(&mut self, b: &[u8]) -> Result<Vec<u8>, MaskError> {
        match self {
            ChannelMasker::Json(m) => m.feed(b),
            ChannelMasker::Text(m) => Ok(m.feed(b)),
            ChannelMasker::Pass => Ok(b.to_vec()),
        }
    }
    fn finish(self) -> Result<Vec<u8>, MaskError> {
        match self {
            ChannelMasker::Json(m) => m.finish(),
            ChannelMasker::Text(m) => Ok(m.finish()),
            ChannelMasker::Pass => Ok(Vec::new()),
        }
    }
}

const OP_CONT: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// The server's side of a WebSocket stream, masked.
pub struct WsMasker {
    content: WsContent,
    codec: WsCodec,
    plan: Arc<Plan>,
    detectors: Option<Arc<Detectors>>,
    /// Bytes of a frame not complete yet.
    buf: Vec<u8>,
    /// The message being assembled: its opcode and payload so far.
    message: Option<(u8, Vec<u8>)>,
    /// Maskers by channel (one for codecs without channels), with the opcode of the
    /// channel's last message.
    channels: Vec<(u8, ChannelMasker, u8)>,
    closed: bool,
}

impl WsMasker {
    pub fn new(
        content: WsContent,
        codec: WsCodec,
        plan: Arc<Plan>,
        detectors: Option<Arc<Detectors>>,
    ) -> WsMasker {
        WsMasker {
            content,
            codec,
            plan,
            detectors,
            buf: Vec::new(),
            message: None,
            channels: Vec::new(),
            closed: false,
        }
    }

    /// The server's bytes in; the frames to send the agent out.
    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<u8>, MaskError> {
        self.buf.extend_from_slice(input);
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((frame, used)) = parse(&self.buf[at..])? {
            at += used;
            self.frame(frame, &mut out)?;
        }
        self.buf.drain(..at);
        Ok(out)
    }

    /// The server's side ended: what the maskers still hold, as last messages.
    pub fn finish(mut self) -> Result<Vec<u8>, MaskError> {
        let mut out = Vec::new();
        if !self.closed {
            self.flush(&mut out)?;
        }
        Ok(out)
    }

    /// A close frame telling the agent the stream was stopped (1011), for when
    /// masking fails.
    pub fn error_close(why: &str) -> Vec<u8> {
        let mut payload = 1011u16.to_be_bytes().to_vec();
        let mut reason = why.as_bytes();
        while reason.len() > 123 {
            reason = &reason[..123];
        }
        // Cut on a character boundary.
        let reason = String::from_utf8_lossy(reason);
        let reason = reason.trim_end_matches('\u{fffd}');
        payload.extend_from_slice(reason.as_bytes());
        let mut out = Vec::new();
        write_frame(&mut out, OP_CLOSE, &payload);
        out
    }

    fn frame(&mut self, f: Frame, out: &mut Vec<u8>) -> Result<(), MaskError> {
        match f.opcode {
            OP_CLOSE => {
                self.flush(out)?;
                self.closed = true;
                let payload = if f.payload.len() >= 2 {
                    let mut p = f.payload[..2].to_vec();
                    p.extend_from_slice(&self.masked_text(&f.payload[2..]));
                    p.truncate(125);
                    p
                } else {
                    f.payload
                };
                write_frame(out, OP_CLOSE, &payload);
            }
            OP_PING | OP_PONG => {
                let mut p = self.masked_text(&f.payload);
                p.truncate(125);
                write_frame(out, f.opcode, &p);
            }
            OP_TEXT | OP_BINARY => {
                if self.message.is_some() {
                    return Err(protocol("a new message began inside a fragmented one"));
                }
                self.message = Some((f.opcode, f.payload));
                if f.fin {
                    self.message_done(out)?;
                }
            }
            OP_CONT => {
                let Some((_, m)) = &mut self.message else {
                    return Err(protocol("a continuation frame outside a message"));
                };
                if m.len() + f.payload.len() > MAX_MESSAGE {
                    return Err(MaskError::TooLong);
                }
                m.extend_from_slice(&f.payload);
                if f.fin {
                    self.message_done(out)?;
                }
            }
            _ => return Err(protocol("an unknown opcode")),
        }
        Ok(())
    }

    /// A whole message: decoded, masked on its channel, encoded, sent as one frame.
    fn message_done(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        let Some((opcode, payload)) = self.message.take() else {
            return Ok(());
        };
        let (channel, body) = if self.codec.channels() {
            match payload.split_first() {
                None => (None, &payload[..]),
                Some((&c, rest)) => {
                    let c = if self.codec.base64() {
                        c.checked_sub(b'0')
                            .filter(|c| *c <= 9)
                            .ok_or(protocol("a base64 channel that is not a digit"))?
                    } else {
                        c
                    };
                    (Some(c), rest)
                }
            }
        } else {
            (Some(0), &payload[..])
        };
        let Some(channel) = channel else {
            // An empty message on a channel protocol: nothing to mask.
            write_frame(out, opcode, &[]);
            return Ok(());
        };
        let decoded = if self.codec.base64() {
            base64::engine::general_purpose::STANDARD
                .decode(body.trim_ascii())
                .map_err(|_| protocol("a message that is not base64"))?
        } else {
            body.to_vec()
        };
        let masked = self.masker(channel, opcode).feed(&decoded)?;
        self.write_message(out, opcode, channel, &masked);
        Ok(())
    }

    fn write_message(&self, out: &mut Vec<u8>, opcode: u8, channel: u8, masked: &[u8]) {
        let mut payload = Vec::with_capacity(masked.len() + 8);
        if self.codec.channels() {
            payload.push(if self.codec.base64() {
                b'0' + channel
            } else {
                channel
            });
        }
        if self.codec.base64() {
            payload.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(masked)
                    .as_bytes(),
            );
        } else {
            payload.extend_from_slice(masked);
        }
        write_frame(out, opcode, &payload);
    }

    fn masker(&mut self, channel: u8, opcode: u8) -> &mut ChannelMasker {
        let i = match self.channels.iter().position(|(c, _, _)| *c == channel) {
            Some(i) => i,
            None => {
                let m = match (self.content, &self.detectors) {
                    (WsContent::Json, _) => ChannelMasker::Json(JsonMasker::new(self.plan.clone())),
                    (WsContent::Text, Some(d)) => ChannelMasker::Text(TextMasker::new(d.clone())),
                    (WsContent::Text, None) => ChannelMasker::Pass,
                };
                self.channels.push((channel, m, opcode));
                self.channels.len() - 1
            }
        };
        self.channels[i].2 = opcode;
        &mut self.channels[i].1
    }

    /// What every channel's masker still holds (a log's last line without its end),
    /// as one last message each.
    fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        for (channel, m, opcode) in std::mem::take(&mut self.channels) {
            let rest = m.finish()?;
            if !rest.is_empty() {
                self.write_message(out, opcode, channel, &rest);
            }
        }
        Ok(())
    }

    fn masked_text(&self, b: &[u8]) -> Vec<u8> {
        match &self.detectors {
            Some(d) => d.apply(b).into_owned(),
            None => b.to_vec(),
        }
    }
}

fn protocol(why: &'static str) -> MaskError {
    MaskError::WebSocket(why)
}

struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// One frame from the front of `b` and the bytes it took; `None` until it is all there.
fn parse(b: &[u8]) -> Result<Option<(Frame, usize)>, MaskError> {
    if b.len() < 2 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    if b[0] & 0x70 != 0 {
        return Err(protocol(
            "a frame with reserved bits set (a compression extension)",
        ));
    }
    let opcode = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([b[2], b[3]])), 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(l), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > MAX_MESSAGE as u64 {
        return Err(MaskError::TooLong);
    }
    if opcode >= OP_CLOSE && (len > 125 || !fin) {
        return Err(protocol(
            "a control frame longer than 125 bytes or fragmented",
        ));
    }
    let key = if masked {
        if b.len() < at + 4 {
            return Ok(None);
        }
        let k = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        at += 4;
        Some(k)
    } else {
        None
    };
    let end = at + len as usize;
    if b.len() < end {
        return Ok(None);
    }
    let mut payload = b[at..end].to_vec();
    if let Some(k) = key {
        for (i, x) in payload.iter_mut().enumerate() {
            *x ^= k[i % 4];
        }
    }
    Ok(Some((
        Frame {
            fin,
            opcode,
            payload,
        },
        end,
    )))
}

/// A final, unmasked frame (a server's).
fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Frames as a server writes them, for tests (here, the gate's and the bench's).
pub fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, opcode, payload);
    if !fin {
        out[0] &= 0x7f;
    }
    out
}

/// Every message in `b` (frames as the gate sends them): (opcode, payload), in order,
/// continuation frames joined.
pub fn read_messages(mut b: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, MaskError> {
    let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut open = false;
    while let Some((f, used)) = parse(b)? {
        b = &b[used..];
        if f.opcode == OP_CONT && open {
            if let Some(last) = out.last_mut() {
                last.1.extend_from_slice(&f.payload);
            }
        } else {
            out.push((f.opcode, f.payload));
        }
        open = !f.fin && f.opcode < OP_CLOSE;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Arc<Plan> {
        Arc::new(Plan::new(
            Plan::secret_paths(),
            Some(Arc::new(Detectors::new())),
            None,
        ))
    }

    fn run(m: &mut WsMasker, wire: &[u8], chunk: usize) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        for c in wire.chunks(chunk) {
            out.extend(m.feed(c).unwrap());
        }
        read_messages(&out).unwrap()
    }

    #[test]
    fn protocols_map_to_codecs() {
        for (p, c) in [
            ("", Some(WsCodec::Raw)),
            ("binary.k8s.io", Some(WsCodec::Raw)),
            ("base64.binary.k8s.io", Some(WsCodec::Base64)),
            ("channel.k8s.io", Some(WsCodec::Channel)),
            ("v4.channel.k8s.io", Some(WsCodec::Channel)),
            ("v5.channel.k8s.io", Some(WsCodec::Channel)),
            ("base64.channel.k8s.io", Some(WsCodec::Base64Channel)),
            ("v4.base64.channel.k8s.io", Some(WsCodec::Base64Channel)),
            ("SPDY/3.1+portforward.k8s.io", None),
            ("v.channel.k8s.io", None),
            ("chat", None),
        ] {
            assert_eq!(WsCodec::from_protocol(p), c, "{p}");
        }
    }

    #[test]
    fn watch_events_are_masked_message_by_message_in_every_chunking() {
        let ev = |n: &str| {
            format!(
                "{{\"type\":\"ADDED\",\"object\":{{\"kind\":\"Secret\",\"metadata\":{{\"name\":\"{n}\"}},\"data\":{{\"k\":\"Q0FOQVJZ\"}}}}}}\n"
            )
        };
        let mut wire = server_frame(OP_TEXT, true, ev("a").as_bytes());
        // A fragmented message, a ping between.
        let b = ev("b");
        let (x, y) = b.as_bytes().split_at(20);
        wire.extend(server_frame(OP_TEXT, false, x));
        wire.extend(server_frame(OP_PING, true, b""));
        wire.extend(server_frame(OP_CONT, true, y));
        wire.extend(server_frame(OP_CLOSE, true, &1000u16.to_be_bytes()));
        for chunk in [1, 3, 7, 64, wire.len()] {
            let mut m = WsMasker::new(WsContent::Json, WsCodec::Raw, plan(), None);
            let msgs = run(&mut m, &wire, chunk);
            let ops: Vec<u8> = msgs.iter().map(|(o, _)| *o).collect();
            assert_eq!(ops, [OP_TEXT, OP_PING, OP_TEXT, OP_CLOSE], "chunk {chunk}");
            for (op, p) in &msgs[..3] {
                let s = String::from_utf8_lossy(p);
                assert!(!s.contains("Q0FOQVJZ"), "{s}");
                if *op == OP_TEXT {
                    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
                    assert_eq!(v["object"]["data"]["k"], "cG9ydGN1bGxpcy1tYXNrZWQ=");
                }
            }
        }
    }

    #[test]
    fn logs_are_masked_in_every_codec() {
        let d = Arc::new(Detectors::new());
        let log = b"line one\nconnecting with password=hunter2 now\nAKIAIOSFODNN7EXAMPLE tail";
        for codec in [
            WsCodec::Raw,
            WsCodec::Base64,
            WsCodec::Channel,
            WsCodec::Base64Channel,
        ] {
            let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
            let mut wire = Vec::new();
            // The server's first (empty) message, then chunks cut mid-line.
            for part in [&b""[..], &log[..20], &log[20..50], &log[50..]] {
                let mut p = Vec::new();
                match codec {
                    WsCodec::Raw => p.extend_from_slice(part),
                    WsCodec::Base64 => p.extend_from_slice(b64(part).as_bytes()),
                    WsCodec::Channel => {
                        p.push(1);
                        p.extend_from_slice(part);
                    }
                    WsCodec::Base64Channel => {
                        p.push(b'1');
                        p.extend_from_slice(b64(part).as_bytes());
                    }
                }
                let op = if codec.base64() { OP_TEXT } else { OP_BINARY };
                wire.extend(server_frame(op, true, &p));
            }
            let mut m = WsMasker::new(WsContent::Text, codec, plan(), Some(d.clone()));
            let mut out = m.feed(&wire).unwrap();
            out.extend(m.finish().unwrap());
            let mut text = Vec::new();
            for (_, p) in read_messages(&out).unwrap() {
                let mut p = &p[..];
                if codec.channels() && !p.is_empty() {
                    let c = if codec.base64() { p[0] - b'0' } else { p[0] };
                    assert_eq!(c, 1, "{codec:?}: the channel is kept");
                    p = &p[1..];
                }
                if codec.base64() {
                    text.extend(base64::engine::general_purpose::STANDARD.decode(p).unwrap());
                } else {
                    text.extend_from_slice(p);
                }
            }
            assert_eq!(
                String::from_utf8(text).unwrap(),
                "line one\nconnecting with password=[masked] now\n[masked:aws-key] tail",
                "{codec:?}"
            );
        }
    }

    #[test]
    fn what_cannot_be_masked_is_an_error() {
        let d = Some(Arc::new(Detectors::new()));
        let mut compressed = server_frame(OP_TEXT, true, b"x");
        compressed[0] |= 0x40;
        let mut m = WsMasker::new(WsContent::Json, WsCodec::Raw, plan(), d.clone());
        assert!(m.feed(&compressed).is_err());
        // Protobuf (or anything not JSON) in a watch message.
        let mut m = WsMasker::new(WsContent::Json, WsCodec::Raw, plan(), d.clone());
        assert!(
            m.feed(&server_frame(OP_BINARY, true, b"k8s\0\x0a\x02"))
                .is_err()
        );
        let mut m = WsMasker::new(WsContent::Text, WsCodec::Base64, plan(), d.clone());
        assert!(
            m.feed(&server_frame(OP_TEXT, true, b"not base64!"))
                .is_err()
        );
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(MAX_MESSAGE as u64 + 1).to_be_bytes());
        let mut m = WsMasker::new(WsContent::Text, WsCodec::Raw, plan(), d);
        assert_eq!(m.feed(&huge), Err(MaskError::TooLong));
        let close = WsMasker::error_close(&"x".repeat(300));
        assert_eq!(read_messages(&close).unwrap()[0].1.len(), 125);
    }
}
