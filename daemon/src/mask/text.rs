//! Text bodies (pod logs, `logs -f`) masked line by line; a PEM private key spanning
//! lines is removed whole.
use std::sync::Arc;

use super::{Detectors, MAX_LINE};

/// Masks a text stream (pod logs) line by line.
pub struct TextMasker {
    detectors: Arc<Detectors>,
    line: Vec<u8>,
    in_pem: bool,
}

impl TextMasker {
    pub fn new(detectors: Arc<Detectors>) -> Self {
        TextMasker {
            detectors,
            line: Vec::new(),
            in_pem: false,
        }
    }

    /// Masks every complete line in `input`; a partial last line waits for its end
    /// (or for [`MAX_LINE`] bytes).
    pub fn feed(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + 32);
        let mut rest = input;
        // The line the last chunk left open ends first.
        if !self.line.is_empty() {
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                self.line.extend_from_slice(rest);
                self.flush_long(&mut out);
                return out;
            };
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(&rest[..=nl]);
            self.mask_line(&line, &mut out);
            line.clear();
            self.line = line;
            rest = &rest[nl + 1..];
        }
        // Then the complete lines: in one pass of the detectors (no pattern spans lines)
        // up to a private-key header; from there line by line until the key ends.
        while let Some(last_nl) = memchr::memrchr(b'\n', rest) {
            if !self.in_pem {
                let complete = &rest[..=last_nl];
                let upto = match memchr::memmem::find(complete, b"-----BEGIN") {
                    None => complete.len(),
                    Some(b) => memchr::memrchr(b'\n', &complete[..b]).map_or(0, |i| i + 1),
                };
                if upto > 0 {
                    self.detectors.apply_into(&rest[..upto], &mut out);
                    rest = &rest[upto..];
                    continue;
                }
            }
            // A newline is left (`last_nl`): never breaks.
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                break;
            };
            self.mask_line(&rest[..=nl], &mut out);
            rest = &rest[nl + 1..];
        }
        self.line.extend_from_slice(rest);
        self.flush_long(&mut out);
        out
    }

    /// A line longer than [`MAX_LINE`] is masked as it stands rather than held.
    fn flush_long(&mut self, out: &mut Vec<u8>) {
        if self.line.len() >= MAX_LINE {
            let line = std::mem::take(&mut self.line);
            self.mask_line(&line, out);
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() {
            self.mask_line(&line, &mut out);
        }
        out
    }

    fn mask_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let d = self.detectors.clone();
        if self.in_pem {
            // Inside a private key: drop lines up to and including its end.
            if let Some(m) = d.pem_end.find(line) {
                self.in_pem = false;
                let rest = &line[m.end()..];
                if !rest.iter().all(u8::is_ascii_whitespace) {
                    d.apply_into(rest, out);
                }
            }
            return;
        }
        if memchr::memmem::find(line, b"-----BEGIN").is_some()
            && let Some(b) = d.pem_begin.find(line)
            && !d.pem_end.is_match(&line[b.end()..])
        {
            self.in_pem = true;
            d.apply_into(&line[..b.start()], out);
            out.extend_from_slice(b"[masked:private-key]\n");
            return;
        }
        d.apply_into(line, out);
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// `log` masked as it arrives in chunks of `size` bytes.
    fn masked_in_chunks(d: &Arc<Detectors>, log: &str, size: usize) -> String {
        let mut m = TextMasker::new(d.clone());
        let mut out = Vec::new();
        for c in log.as_bytes().chunks(size) {
            out.extend(m.feed(c));
        }
        out.extend(m.finish());
        String::from_utf8(out).expect("masked text stays UTF-8")
    }

    #[test]
    fn log_lines_are_masked_incrementally_and_pem_blocks_dropped() {
        let d = Arc::new(Detectors::new());
        let log = "start\nconnecting with password=hunter2 now\n-----BEGIN PRIVATE KEY-----\nMIIEvQ\nABCD\n-----END PRIVATE KEY-----\nafter AKIAIOSFODNN7EXAMPLE\n-----BEGIN CERTIFICATE----- token: abc\nlast pwd=x\npartial tok";
        // Every chunking gives the same result: lines cut anywhere, several per chunk.
        for size in [1, 5, 7, 13, 40, 64, log.len()] {
            let s = masked_in_chunks(&d, log, size);
            assert_eq!(
                s,
                "start\nconnecting with password=[masked] now\n[masked:private-key]\nafter [masked:aws-key]\n-----BEGIN CERTIFICATE----- token: [masked]\nlast pwd=[masked]\npartial tok",
                "chunks of {size}"
            );
        }
    }

    /// No detector reaches across a line end: a keyword at the end of one line
    /// (`Bearer`, `Authorization:`, `password:`) never takes the next line for its
    /// value, which would leave that line's own credential unmasked.
    #[test]
    fn no_pattern_spans_lines() {
        let d = Arc::new(Detectors::new());
        for head in [
            "Bearer ",
            "Authorization: Bearer",
            "authorization:",
            "token:",
            "x --token",
        ] {
            let log =
                format!("{head}\npassword=hunter2hunter2\nAuthorization: Basic dXNlcjpwYXNz\n");
            for size in [1, 3, 8, log.len()] {
                let s = masked_in_chunks(&d, &log, size);
                assert!(
                    !s.contains("hunter2") && !s.contains("dXNlcjpwYXNz"),
                    "{head:?}, chunks of {size}: {s}"
                );
                assert_eq!(s.lines().count(), 3, "{s}");
            }
        }
    }
}
