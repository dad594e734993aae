//! The streaming JSON masker: fed a body chunk by chunk, it rewrites string values as
//! they pass (numbers, keys and structure byte for byte), holding only the current
//! string and the container stack, so a watch is masked event by event and a large
//! list without being held.
use std::sync::Arc;

use super::{
    Encoding, LAST_APPLIED, MAX_DEPTH, MAX_STRING, MaskError, PLACEHOLDER, Plan,
    names::{is_credential_flag, is_credential_key, is_credential_name},
    paths::{EXEMPT_KEYS, ROOTS, Seg},
};

/// How the value now starting is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Detectors run over it.
    Plain,
    /// Replaced (the whole subtree for a container).
    Mask(Encoding),
    /// The last-applied annotation: parsed and masked as an object.
    LastApplied,
    /// A Table cell in a column that shows a credential: replaced.
    Cell,
    /// An identifier clients depend on: passed as is.
    Exempt,
}

#[derive(Debug)]
struct Frame {
    array: bool,
    /// The current key (objects), as it appears in the body (escaped).
    key: Vec<u8>,
    /// Set when the whole container is masked.
    masked: Option<Encoding>,
    expect_key: bool,
    /// A `name` (or `key`) field in this object named a credential: its `value` is
    /// masked.
    secret_name: bool,
    /// A `name` or `key` field was seen in this object.
    name_seen: bool,
    /// A `value` string written before any `name`: where it is in the output (held
    /// until the object closes, then masked if the name turns out a credential's).
    value_span: Option<(usize, usize)>,
    /// Arrays: the index of the current element.
    index: usize,
    /// Arrays: the previous element was a credential flag (`--db-password`), so this
    /// one is its value.
    after_flag: bool,
    /// Bit `r`: the frames below this one match [`ROOTS`]`[r]` as far as they reach
    /// into it (fixed while this frame is open; see [`JsonMasker::matches_root`]).
    roots_below: u8,
    /// The roots of `roots_below` from which a value in this frame is as deep as a
    /// path or the last-applied annotation can be ([`Plan::depth_roots`]): the only
    /// ones a value here is looked up under.
    live_roots: u8,
}

impl Frame {
    fn new(
        array: bool,
        key: Vec<u8>,
        masked: Option<Encoding>,
        roots_below: u8,
        live_roots: u8,
    ) -> Frame {
        Frame {
            roots_below,
            live_roots,
            array,
            key,
            masked,
            expect_key: !array,
            secret_name: false,
            name_seen: false,
            value_span: None,
            index: 0,
            after_flag: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Between,
    Str { key: bool, mode: Mode, esc: bool },
    Lit { masked: bool },
}

/// Streaming JSON masker; feed it the body chunk by chunk. Several top-level values in
/// a row (a watch stream's events) are handled like one.
pub struct JsonMasker {
    plan: Arc<Plan>,
    frames: Vec<Frame>,
    lex: Lex,
    sbuf: Vec<u8>,
    /// Key buffers of closed objects, reused by the next ones (no allocation per
    /// object once the stack has been as deep).
    spare_keys: Vec<Vec<u8>>,
    offset: u64,
    out: Vec<u8>,
    /// Output from here on is held back (a `value` whose `name` is still to come).
    hold: Option<usize>,
    /// Table columns (by index) that show a credential, from the Table's
    /// `columnDefinitions`; kept across a watch's events (later ones omit them).
    secret_columns: Vec<bool>,
}

/// Frames and key bytes made room for at the start (an object's keys are short; a
/// Kubernetes object nests about eight deep).
const FRAMES_AHEAD: usize = 12;
const KEY_AHEAD: usize = 32;

/// A masker's container stack and key buffers, kept per thread when it is done for
/// the next one (every answer gets a masker: a small answer's would otherwise
/// allocate a stack and a key buffer per object it opens). Bounded: at most
/// [`SCRATCH_KEPT`] per thread, and none that grew past an ordinary object's depth
/// or key length. Nothing is read from them but what the next masker writes (they are
/// cleared), as with memory the allocator hands out again.
struct Scratch {
    frames: Vec<Frame>,
    spare_keys: Vec<Vec<u8>>,
}

const SCRATCH_KEPT: usize = 8;
const SCRATCH_MAX_FRAMES: usize = 64;
const SCRATCH_MAX_KEY: usize = 256;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Scratch>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    fn take() -> Scratch {
        SCRATCH
            .with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.pop()))
            .unwrap_or_else(|| Scratch {
                frames: Vec::with_capacity(FRAMES_AHEAD),
                spare_keys: Vec::with_capacity(FRAMES_AHEAD),
            })
    }

    fn keep(mut self) {
        if self.frames.capacity() > SCRATCH_MAX_FRAMES
            || self.spare_keys.capacity() > SCRATCH_MAX_FRAMES
        {
            return;
        }
        // Frames still open (an abandoned stream) give back their key buffers.
        for f in self.frames.drain(..) {
            self.spare_keys.push(f.key);
        }
        self.spare_keys.retain(|k| k.capacity() <= SCRATCH_MAX_KEY);
        for k in &mut self.spare_keys {
            k.clear();
        }
        self.spare_keys.truncate(SCRATCH_MAX_FRAMES);
        let _ = SCRATCH.try_with(|s| {
            if let Ok(mut s) = s.try_borrow_mut()
                && s.len() < SCRATCH_KEPT
            {
                s.push(self);
            }
        });
    }
}

impl Drop for JsonMasker {
    fn drop(&mut self) {
        Scratch {
            frames: std::mem::take(&mut self.frames),
            spare_keys: std::mem::take(&mut self.spare_keys),
        }
        .keep();
    }
}

impl JsonMasker {
    pub fn new(plan: Arc<Plan>) -> Self {
        // Sized for an ordinary object's depth and keys, so a small body does not grow
        // them step by step (each growth is an allocation); a previous masker's on
        // this thread when there is one.
        let Scratch { frames, spare_keys } = Scratch::take();
        JsonMasker {
            plan,
            frames,
            lex: Lex::Between,
            sbuf: Vec::new(),
            spare_keys,
            offset: 0,
            out: Vec::new(),
            hold: None,
            secret_columns: Vec::new(),
        }
    }

    /// Masks `input`, returning what can be sent now.
    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<u8>, MaskError> {
        self.out.reserve(input.len() + 64);
        let mut i = 0;
        while i < input.len() {
            match self.lex {
                Lex::Between => {
                    let b = input[i];
                    match b {
                        b' ' | b'\t' | b'\r' | b'\n' => self.out.push(b),
                        b'{' | b'[' => {
                            let mode = self.value_mode(true);
                            self.element_starts();
                            if self.frames.len() >= MAX_DEPTH {
                                return Err(MaskError::TooDeep);
                            }
                            let masked = match mode {
                                Mode::Mask(e) => Some(e),
                                Mode::Cell => Some(Encoding::Text),
                                _ => None,
                            };
                            if b == b'[' && masked.is_none() && self.at_column_definitions() {
                                self.secret_columns.clear();
                            }
                            let mut key = self
                                .spare_keys
                                .pop()
                                .unwrap_or_else(|| Vec::with_capacity(KEY_AHEAD));
                            key.clear();
                            let roots_below = self.roots_below_next();
                            // In range: fewer than MAX_DEPTH frames are open here (checked
                            // above) and `depth_roots` has MAX_DEPTH + 1 entries (the
                            // TooDeep test opens every depth up to it).
                            let live_roots =
                                roots_below & self.plan.depth_roots[self.frames.len() + 1];
                            self.frames.push(Frame::new(
                                b == b'[',
                                key,
                                masked,
                                roots_below,
                                live_roots,
                            ));
                            self.out.push(b);
                        }
                        b'}' | b']' => {
                            let f = match self.frames.pop() {
                                Some(f) if f.array == (b == b']') => f,
                                _ => return Err(self.syntax(i, "unbalanced bracket")),
                            };
                            if let Some(span) = f.value_span {
                                self.settle_value(span, f.secret_name);
                            }
                            self.spare_keys.push(f.key);
                            self.out.push(b);
                            // The comma that most often follows, at once.
                            if input.get(i + 1) == Some(&b',') {
                                self.comma();
                                i += 1;
                            }
                        }
                        b':' => self.out.push(b),
                        b',' => self.comma(),
                        b'"' => {
                            let is_key =
                                self.frames.last().is_some_and(|f| !f.array && f.expect_key);
                            let mode = if is_key {
                                Mode::Exempt
                            } else {
                                let m = self.value_mode(false);
                                self.element_starts();
                                m
                            };
                            if mode == Mode::Exempt && !is_key {
                                self.out.push(b'"');
                            }
                            // Most strings end in the chunk they start in: taken from
                            // it whole, without being gathered first.
                            if let Some(len) = string_len(&input[i + 1..]) {
                                let content = &input[i + 1..i + 1 + len];
                                if content.len() > MAX_STRING && gathers(mode, is_key, &self.plan) {
                                    return Err(MaskError::TooLong);
                                }
                                let mut end = i + len + 2;
                                if is_key {
                                    // Keys pass as they are: the string, its quotes and
                                    // the colon that most often follows in one copy.
                                    end += usize::from(input.get(end) == Some(&b':'));
                                    self.out.extend_from_slice(&input[i..end]);
                                    self.key_read(content);
                                } else {
                                    self.end_string(false, mode, content);
                                    // The comma that most often follows, at once.
                                    if input.get(end) == Some(&b',') {
                                        self.comma();
                                        end += 1;
                                    }
                                }
                                i = end;
                                continue;
                            }
                            self.sbuf.clear();
                            self.lex = Lex::Str {
                                key: is_key,
                                mode,
                                esc: false,
                            };
                        }
                        b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                            let masked =
                                matches!(self.value_mode(false), Mode::Mask(_) | Mode::Cell)
                                    && (b == b'-' || b.is_ascii_digit());
                            self.element_starts();
                            self.out.push(if masked { b'0' } else { b });
                            self.lex = Lex::Lit { masked };
                        }
                        _ => return Err(self.syntax(i, "unexpected character")),
                    }
                    i += 1;
                }
                Lex::Lit { masked } => {
                    let b = input[i];
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n') {
                        self.lex = Lex::Between;
                        continue;
                    }
                    if !masked {
                        self.out.push(b);
                    }
                    i += 1;
                }
                Lex::Str { key, mode, esc } => {
                    let mut start = i;
                    if esc {
                        // The byte after a backslash is part of the escape.
                        self.take(mode, key, &input[i..i + 1])?;
                        i += 1;
                        start = i;
                    }
                    match memchr::memchr2(b'"', b'\\', &input[i..]) {
                        None => {
                            self.take(mode, key, &input[start..])?;
                            self.lex = Lex::Str {
                                key,
                                mode,
                                esc: false,
                            };
                            i = input.len();
                        }
                        Some(j) => {
                            let at = i + j;
                            self.take(mode, key, &input[start..at])?;
                            if input[at] == b'\\' {
                                self.take(mode, key, b"\\")?;
                                if at + 1 < input.len() {
                                    self.take(mode, key, &input[at + 1..at + 2])?;
                                    i = at + 2;
                                    self.lex = Lex::Str {
                                        key,
                                        mode,
                                        esc: false,
                                    };
                                } else {
                                    i = at + 1;
                                    self.lex = Lex::Str {
                                        key,
                                        mode,
                                        esc: true,
                                    };
                                }
                            } else {
                                let sbuf = std::mem::take(&mut self.sbuf);
                                self.end_string(key, mode, &sbuf);
                                self.sbuf = sbuf;
                                self.lex = Lex::Between;
                                i = at + 1;
                            }
                        }
                    }
                }
            }
        }
        self.offset += input.len() as u64;
        Ok(self.ready())
    }

    /// A comma between elements: the next one is an array's next index, or an
    /// object's next key.
    fn comma(&mut self) {
        if let Some(f) = self.frames.last_mut() {
            if f.array {
                f.index += 1;
            } else {
                f.expect_key = true;
            }
        }
        self.out.push(b',');
    }

    /// The output that can go now: all of it, or what precedes a held `value`.
    fn ready(&mut self) -> Vec<u8> {
        let Some(h) = self.hold else {
            return std::mem::take(&mut self.out);
        };
        let rest = self.out.split_off(h);
        let ready = std::mem::replace(&mut self.out, rest);
        // What stays is now at the front: every held span moves with it.
        for f in &mut self.frames {
            if let Some((a, b)) = &mut f.value_span {
                *a -= h;
                *b -= h;
            }
        }
        self.hold = Some(0);
        ready
    }

    /// A new value starts in the current container: an array's element after a
    /// credential flag has been decided on.
    fn element_starts(&mut self) {
        if let Some(f) = self.frames.last_mut()
            && f.array
        {
            f.after_flag = false;
        }
    }

    /// An object that held a `value` closes: the value is masked if a `name` beside it
    /// named a credential, and released.
    fn settle_value(&mut self, (a, b): (usize, usize), secret: bool) {
        if secret {
            let mut placeholder = Vec::new();
            self.plan
                .placeholder(Encoding::Text, &self.out[a + 1..b - 1], &mut placeholder);
            self.out.splice(a..b, placeholder);
        }
        // Held while an enclosing object holds a value of its own (spans of closed
        // objects are settled already).
        self.hold = self
            .frames
            .iter()
            .filter_map(|f| f.value_span.map(|s| s.0))
            .min();
    }

    /// The end of the body: what remains, or an error if it ended inside a value.
    pub fn finish(mut self) -> Result<Vec<u8>, MaskError> {
        match self.lex {
            Lex::Str { .. } => Err(self.syntax(0, "the body ends inside a string")),
            _ if !self.frames.is_empty() => {
                Err(self.syntax(0, "the body ends inside an object or array"))
            }
            _ => {
                self.hold = None;
                Ok(std::mem::take(&mut self.out))
            }
        }
    }

    fn syntax(&self, at: usize, why: &'static str) -> MaskError {
        MaskError::Syntax {
            offset: self.offset + at as u64,
            why,
        }
    }

    /// String content: passed on at once (keys are kept for paths; exempt values go
    /// straight out), held (to decide on the whole string) or dropped (masked).
    fn take(&mut self, mode: Mode, key: bool, bytes: &[u8]) -> Result<(), MaskError> {
        if mode == Mode::Exempt && !key {
            self.out.extend_from_slice(bytes);
            return Ok(());
        }
        if !gathers(mode, key, &self.plan) {
            return Ok(());
        }
        if self.sbuf.len() + bytes.len() > MAX_STRING {
            return Err(MaskError::TooLong);
        }
        self.sbuf.extend_from_slice(bytes);
        Ok(())
    }

    /// A string ends: `s` is its contents (escaped), or what of them is left to write
    /// for an exempt value (whose contents [`Self::take`] writes as they come) and
    /// empty for one masked without fingerprints (whose contents it drops).
    fn end_string(&mut self, key: bool, mode: Mode, s: &[u8]) {
        if key {
            self.out.push(b'"');
            self.out.extend_from_slice(s);
            self.out.push(b'"');
            self.key_read(s);
            return;
        }
        match mode {
            Mode::Exempt => {
                self.out.extend_from_slice(s);
                self.out.push(b'"');
            }
            Mode::Mask(enc) => self.plan.placeholder(enc, s, &mut self.out),
            Mode::Cell => self.plan.placeholder(Encoding::Text, s, &mut self.out),
            Mode::LastApplied => {
                let masked = self.mask_embedded(s, true);
                self.out.extend_from_slice(&masked);
            }
            Mode::Plain => self.plain_string(s),
        }
    }

    /// An object's key was read (`s`, escaped, as in the body): the current key of its
    /// frame.
    fn key_read(&mut self, s: &[u8]) {
        // A key is only read inside an object, so the frame is there.
        if let Some(f) = self.frames.last_mut() {
            f.key.clear();
            f.key.extend_from_slice(s);
            f.expect_key = false;
        }
    }

    /// A string no rule replaces whole: what it says about its neighbours is noted (a
    /// credential's `name`, a credential flag, a Table column), then it is written
    /// with the detectors applied (or, if it holds a JSON document, masked as one).
    fn plain_string(&mut self, s: &[u8]) {
        let start = self.out.len();
        let mut value_first = false;
        let depth = self.frames.len();
        if let Some(f) = self.frames.last_mut() {
            if f.array {
                if is_credential_flag(s) {
                    f.after_flag = true;
                }
            } else if f.key == b"name" || f.key == b"key" {
                f.name_seen = true;
                if is_credential_name(s) {
                    f.secret_name = true;
                }
            } else if f.key == b"value" && !f.name_seen && f.value_span.is_none() {
                // Only objects in arrays (env, parameters) pair a name with a value.
                value_first = depth >= 2 && self.frames[depth - 2].array;
            }
        }
        if let Some((idx, secret)) = self.column_definition(s) {
            if self.secret_columns.len() <= idx {
                self.secret_columns.resize(idx + 1, false);
            }
            self.secret_columns[idx] |= secret;
        }
        let embedded = s.first().is_some_and(|&b| b == b'{' || b == b'[')
            && s.last().is_some_and(|&b| b == b'}' || b == b']');
        if embedded {
            let masked = self.mask_embedded(s, false);
            self.out.extend_from_slice(&masked);
        } else {
            self.out.push(b'"');
            match &self.plan.detectors {
                Some(d) => d.apply_into(s, &mut self.out),
                None => self.out.extend_from_slice(s),
            }
            self.out.push(b'"');
        }
        if value_first && let Some(f) = self.frames.last_mut() {
            f.value_span = Some((start, self.out.len()));
            self.hold = Some(self.hold.map_or(start, |h| h.min(start)));
        }
    }

    /// Whether the current container is a Table's `columnDefinitions` (of a Table
    /// document, or of a watch event's Table).
    fn at_column_definitions(&self) -> bool {
        let n = self.frames.len();
        let table_root = n == 1 || (n == 2 && self.frames[0].key == b"object");
        table_root && !self.frames[n - 1].array && self.frames[n - 1].key == b"columnDefinitions"
    }

    /// A string that is a Table column's `name` or `description`: the column's index
    /// and whether it shows a credential (by its name, or the last field of the
    /// JSONPath a custom resource's column describes itself with).
    fn column_definition(&self, s: &[u8]) -> Option<(usize, bool)> {
        let n = self.frames.len();
        if !(n == 3 || (n == 4 && self.frames[0].key == b"object")) {
            return None;
        }
        let (defs, list, col) = (
            &self.frames[n - 3],
            &self.frames[n - 2],
            &self.frames[n - 1],
        );
        if defs.array || defs.key != b"columnDefinitions" || !list.array || col.array {
            return None;
        }
        let secret = match col.key.as_slice() {
            b"name" => is_credential_name(s),
            // A custom resource's printer column describes itself as `Custom resource
            // definition column (in JSONPath format): .spec.auth.apiToken`; built-in
            // columns describe themselves in prose, which says nothing here.
            b"description" => {
                let path = s.rsplit(|&b| b == b' ').next().unwrap_or(&[]);
                let field = path.rsplit(|&b| b == b'.').next().unwrap_or(&[]);
                let field = field.split(|&b| b == b'[').next().unwrap_or(&[]);
                path.first() == Some(&b'.') && is_credential_name(field)
            }
            _ => return None,
        };
        Some((list.index, secret))
    }

    /// Whether the value starting now is a cell of a Table row, in a column that shows
    /// a credential.
    fn secret_cell(&self) -> bool {
        let n = self.frames.len();
        if self.secret_columns.is_empty()
            || !(n == 4 || (n == 5 && self.frames[0].key == b"object"))
        {
            return false;
        }
        let (rows, row, cells) = (
            &self.frames[n - 4],
            &self.frames[n - 3],
            &self.frames[n - 1],
        );
        !rows.array
            && rows.key == b"rows"
            && row.array
            && !self.frames[n - 2].array
            && self.frames[n - 2].key == b"cells"
            && cells.array
            && self
                .secret_columns
                .get(cells.index)
                .copied()
                .unwrap_or(false)
    }

    /// A string (`s`, escaped) that holds a JSON document: the last-applied
    /// annotation (`last_applied`), or any string that starts and ends like one
    /// (another tool's copy of an object, a ConfigMap's `config.json`). The document
    /// is masked with the same plan and re-encoded as a JSON string (the original
    /// bytes if nothing changed). If it is not JSON, detectors only; a last-applied
    /// annotation without detectors is hidden whole.
    fn mask_embedded(&self, s: &[u8], last_applied: bool) -> Vec<u8> {
        let masked = unescape(s).and_then(|doc| {
            let mut m = JsonMasker::new(self.plan.clone());
            let mut out = m.feed(doc.as_bytes()).ok()?;
            out.extend(m.finish().ok()?);
            if out == doc.as_bytes() {
                return Some(None);
            }
            String::from_utf8(out).ok().map(Some)
        });
        match masked {
            Some(Some(s)) => serde_json::to_vec(&s).unwrap_or_else(|_| b"\"\"".to_vec()),
            Some(None) => {
                let mut quoted = Vec::with_capacity(s.len() + 2);
                quoted.push(b'"');
                quoted.extend_from_slice(s);
                quoted.push(b'"');
                quoted
            }
            None => {
                // Not JSON: treat it as text. Without detectors, the annotation is
                // hidden whole.
                let mut out = vec![b'"'];
                match &self.plan.detectors {
                    Some(d) => out.extend_from_slice(&d.apply(s)),
                    None if last_applied => out.extend_from_slice(PLACEHOLDER.as_bytes()),
                    None => out.extend_from_slice(s),
                }
                out.push(b'"');
                out
            }
        }
    }

    /// The treatment of the value that starts now (an object or array if `container`),
    /// from its path.
    fn value_mode(&mut self, container: bool) -> Mode {
        let Some(top) = self.frames.last() else {
            return Mode::Plain;
        };
        if let Some(e) = top.masked {
            return Mode::Mask(e);
        }
        if top.array && top.after_flag && !container {
            return Mode::Mask(Encoding::Text);
        }
        if top.array && self.secret_cell() {
            return Mode::Cell;
        }
        if !top.array && !container {
            if top.key == b"value" && top.secret_name {
                return Mode::Mask(Encoding::Text);
            }
            if EXEMPT_KEYS.contains(&top.key.as_slice()) {
                return Mode::Exempt;
            }
        }
        let mut live = top.live_roots;
        while live != 0 {
            let r = live.trailing_zeros() as usize;
            live &= live - 1;
            let root = ROOTS[r];
            if !self.matches_root(r, root) {
                continue;
            }
            let rel = &self.frames[root.len()..];
            for (path, enc) in &self.plan.paths {
                if rel.len() == path.0.len()
                    && rel.iter().zip(&path.0).all(|(f, s)| match s {
                        Seg::Any => true,
                        Seg::Key(k) => !f.array && f.key == *k,
                    })
                {
                    return Mode::Mask(*enc);
                }
            }
            if rel.len() == 3
                && !rel[0].array
                && rel[0].key == b"metadata"
                && !rel[1].array
                && rel[1].key == b"annotations"
                && !rel[2].array
                && rel[2].key == LAST_APPLIED.as_bytes()
            {
                return Mode::LastApplied;
            }
        }
        // A credential-named field: its scalar value (a nested object keeps its
        // structure and is checked field by field).
        if !top.array && !container && is_credential_key(&top.key) {
            return Mode::Mask(Encoding::Text);
        }
        Mode::Plain
    }

    /// Whether the open frames start with [`ROOTS`]`[r]` (`root`): the frames below the
    /// top were matched when the top was pushed (`roots_below`), so only the top is
    /// compared here.
    fn matches_root(&self, r: usize, root: &[Option<&str>]) -> bool {
        let Some(top) = self.frames.last() else {
            return root.is_empty();
        };
        top.roots_below & (1 << r) != 0
            && (root.len() < self.frames.len()
                || root.len() == self.frames.len()
                    && root_element_matches(root[root.len() - 1], top))
    }

    /// [`Frame::roots_below`] for a frame pushed now.
    fn roots_below_next(&self) -> u8 {
        let Some(top) = self.frames.last() else {
            return u8::MAX;
        };
        let d = self.frames.len() - 1;
        let mut bits = top.roots_below;
        for (r, root) in ROOTS.iter().enumerate() {
            if let Some(&element) = root.get(d)
                && !root_element_matches(element, top)
            {
                bits &= !(1 << r);
            }
        }
        bits
    }
}

/// How long the string whose contents start `s` is, if it ends in `s` (escapes
/// skipped: a `\\"` does not end it).
fn string_len(s: &[u8]) -> Option<usize> {
    let mut k = 0;
    loop {
        let j = k + quote_or_backslash(s.get(k..)?)?;
        if s[j] == b'"' {
            return Some(j);
        }
        k = j + 2;
    }
}

/// The first `"` or `\\` in `s`. Most strings of a Kubernetes object are shorter than
/// sixteen bytes: their first block is checked at once (the compiler compares all
/// sixteen together) instead of starting a vector search, whose setup cost more than
/// the search (callgrind: ~50 instructions a string); past it, `memchr2`.
fn quote_or_backslash(s: &[u8]) -> Option<usize> {
    if let Some(block) = s.first_chunk::<16>() {
        let v = wide::u8x16::new(*block);
        let hits =
            (v.cmp_eq(wide::u8x16::splat(b'"')) | v.cmp_eq(wide::u8x16::splat(b'\\'))).move_mask();
        if hits != 0 {
            return Some(hits.trailing_zeros() as usize);
        }
        return memchr::memchr2(b'"', b'\\', &s[16..]).map(|j| j + 16);
    }
    s.iter().position(|&b| b == b'"' || b == b'\\')
}

/// Whether a string's contents are kept until it ends ([`JsonMasker::take`]), rather
/// than written as they come (an exempt value) or dropped (masked, no fingerprints).
fn gathers(mode: Mode, key: bool, plan: &Plan) -> bool {
    key || !(mode == Mode::Exempt || matches!(mode, Mode::Mask(_)) && plan.fingerprint.is_none())
}

/// The text a JSON string's contents (`escaped`, without its quotes) stand for, as
/// serde_json reads it; `None` where it refuses them. The escapes a document inside a
/// string is full of (`\\"`) are read here, a vector search apart; anything else
/// (`\\u`, control characters) is left to serde_json.
fn unescape(escaped: &[u8]) -> Option<String> {
    let by_serde = || {
        let mut quoted = Vec::with_capacity(escaped.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(escaped);
        quoted.push(b'"');
        serde_json::from_slice(&quoted).ok()
    };
    // Raw control characters: looked for without stopping early, which vectorises.
    if escaped.iter().fold(false, |c, &b| c | (b < 0x20)) {
        return by_serde();
    }
    let mut out = Vec::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(j) = memchr::memchr2(b'\\', b'"', rest) {
        out.extend_from_slice(&rest[..j]);
        if rest[j] == b'"' {
            // A raw quote (not in a string the lexer read).
            return by_serde();
        }
        out.push(match rest.get(j + 1) {
            Some(b'"') => b'"',
            Some(b'\\') => b'\\',
            Some(b'/') => b'/',
            Some(b'b') => 0x08,
            Some(b'f') => 0x0c,
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            _ => return by_serde(),
        });
        rest = &rest[j + 2..];
    }
    out.extend_from_slice(rest);
    String::from_utf8(out).ok()
}

// `Frame::roots_below` has a bit per root.
const _: () = assert!(ROOTS.len() <= 8);

/// Whether an open frame is what one element of a root path names: an array (`None`),
/// or an object at that key.
fn root_element_matches(element: Option<&str>, f: &Frame) -> bool {
    match element {
        None => f.array,
        Some(k) => !f.array && f.key == k.as_bytes(),
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    use crate::mask::{B64_PLACEHOLDER, Detectors, testgen::Rng};

    /// Strings are read as serde_json reads them: every escape, control characters,
    /// broken UTF-8, a lone backslash.
    #[test]
    fn quotes_and_backslashes_are_found_where_memchr_finds_them() {
        // Every length up to three blocks and a tail, the byte sought (or one of each,
        // or none) at every place.
        for len in 0..50 {
            for at in 0..=len {
                for (c, d) in [
                    (b'"', b'x'),
                    (b'\\', b'x'),
                    (b'"', b'\\'),
                    (b'\\', b'"'),
                    (b'x', b'x'),
                ] {
                    let mut s = vec![b'a'; len];
                    if at < len {
                        s[at] = c;
                    }
                    if at + 3 < len {
                        s[at + 3] = d;
                    }
                    assert_eq!(
                        super::quote_or_backslash(&s),
                        memchr::memchr2(b'"', b'\\', &s),
                        "{:?}",
                        String::from_utf8_lossy(&s)
                    );
                }
            }
        }
    }

    #[test]
    fn unescape_reads_strings_as_serde_json_does() {
        let parts: [&[u8]; 16] = [
            b"a",
            b"\\\"",
            b"\\\\",
            b"\\/",
            b"\\n",
            b"\\t",
            b"\\b\\f\\r",
            b"\\u00e9",
            b"\\ud83d\\ude00",
            b"\\ud83d",
            b"\\x",
            b"\\",
            b"\n",
            "\u{e9}".as_bytes(),
            b"\xff",
            b"{}",
        ];
        let mut rng = Rng::new(0x853c_49e6_748f_ea9b);
        let (mut read, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let s = rng.joined(&parts, 7);
            let mut quoted = b"\"".to_vec();
            quoted.extend_from_slice(&s);
            quoted.push(b'"');
            let want = serde_json::from_slice::<String>(&quoted).ok();
            match &want {
                Some(_) => read += 1,
                None => refused += 1,
            }
            assert_eq!(unescape(&s), want, "{:?}", String::from_utf8_lossy(&s));
        }
        assert!(
            read > 2_000 && refused > 2_000,
            "{read} read, {refused} refused"
        );
    }

    fn secrets_plan() -> Arc<Plan> {
        Arc::new(Plan::new(
            Plan::secret_paths(),
            Some(Arc::new(Detectors::new())),
            None,
        ))
    }

    fn mask_chunks(plan: &Arc<Plan>, body: &[u8], chunk: usize) -> Vec<u8> {
        let mut m = JsonMasker::new(plan.clone());
        let mut out = Vec::new();
        for c in body.chunks(chunk.max(1)) {
            out.extend(m.feed(c).unwrap());
        }
        out.extend(m.finish().unwrap());
        out
    }

    fn mask(plan: &Arc<Plan>, body: &str) -> String {
        let whole = mask_chunks(plan, body.as_bytes(), body.len());
        // Every chunking gives the same result.
        for chunk in [1, 2, 3, 7, 64] {
            assert_eq!(
                mask_chunks(plan, body.as_bytes(), chunk),
                whole,
                "chunk size {chunk}"
            );
        }
        String::from_utf8(whole).unwrap()
    }

    /// A masker that takes the stack and key buffers a previous one left on the thread
    /// (even one abandoned deep inside an answer, mid-key) masks exactly as a masker
    /// on a thread that never masked anything; the thread keeps a bounded number.
    #[test]
    fn maskers_reusing_a_threads_scratch_mask_as_new_ones() {
        let p = secrets_plan();
        let body = r#"{"kind":"Secret","metadata":{"name":"s","annotations":{"a":"b"}},"data":{"password":"aHVudGVyMg=="},"stringData":{"token":"ghp_abcdefghijklmnopqrstuvwxyz0123456789"},"x":[{"name":"DB_PASSWORD","value":"hunter2hunter2"}]}"#;
        let fresh = {
            let (p, body) = (p.clone(), body.to_owned());
            std::thread::spawn(move || mask_chunks(&p, body.as_bytes(), 5))
                .join()
                .unwrap()
        };
        assert!(!String::from_utf8_lossy(&fresh).contains("hunter2"));
        let deep = format!(
            "{}\"a-very-long-key-{}",
            r#"{"a":{"b":[{"c":{"d":"#.repeat(6),
            "k".repeat(300)
        );
        for round in 0..3 {
            // The next masker on this thread takes what this one leaves.
            let mut abandoned = JsonMasker::new(p.clone());
            let _ = abandoned.feed(deep.as_bytes());
            drop(abandoned);
            for chunk in [1, 5, body.len()] {
                assert_eq!(
                    mask_chunks(&p, body.as_bytes(), chunk),
                    fresh,
                    "round {round}, chunk {chunk}"
                );
            }
        }
        let maskers: Vec<_> = (0..SCRATCH_KEPT + 4)
            .map(|_| JsonMasker::new(p.clone()))
            .collect();
        drop(maskers);
        assert_eq!(SCRATCH.with(|s| s.borrow().len()), SCRATCH_KEPT);
    }

    #[test]
    fn secret_get_list_watch_and_table_are_masked() {
        let p = secrets_plan();
        let get = r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"s","resourceVersion":"1234567890123456"},"data":{"a":"Q0FOQVJZ","b\"x":"Q0FOQVJZMg=="},"stringData":{"c":"CANARY3"},"type":"Opaque"}"#;
        let out = mask(&p, get);
        assert!(
            !out.contains("Q0FOQVJZ") && !out.contains("CANARY3"),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["data"]["a"], B64_PLACEHOLDER);
        assert_eq!(v["data"]["b\"x"], B64_PLACEHOLDER);
        assert_eq!(v["stringData"]["c"], PLACEHOLDER);
        assert_eq!(v["metadata"]["resourceVersion"], "1234567890123456");
        // Valid base64 for clients that decode it.
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(B64_PLACEHOLDER)
                .unwrap(),
            PLACEHOLDER.as_bytes()
        );

        let list = r#"{"kind":"SecretList","items":[{"metadata":{"name":"a"},"data":{"k":"Q0FOQVJZ"}},{"metadata":{"name":"b"},"data":{"k":"Q0FOQVJZ"}}]}"#;
        assert!(!mask(&p, list).contains("Q0FOQVJZ"));
        let watch = "{\"type\":\"ADDED\",\"object\":{\"data\":{\"k\":\"Q0FOQVJZ\"}}}\n{\"type\":\"MODIFIED\",\"object\":{\"data\":{\"k\":\"Q0FOQVJZ\"}}}\n";
        let out = mask(&p, watch);
        assert!(!out.contains("Q0FOQVJZ"));
        assert_eq!(out.lines().count(), 2);
        let table = r#"{"kind":"Table","rows":[{"cells":["a","Opaque",1],"object":{"kind":"Secret","data":{"k":"Q0FOQVJZ"}}}]}"#;
        let out = mask(&p, table);
        assert!(
            !out.contains("Q0FOQVJZ") && out.contains(r#"["a","Opaque",1]"#),
            "{out}"
        );
        let watched_table = r#"{"type":"ADDED","object":{"kind":"Table","rows":[{"cells":[],"object":{"data":{"k":"Q0FOQVJZ"}}}]}}"#;
        assert!(!mask(&p, watched_table).contains("Q0FOQVJZ"));
    }

    #[test]
    fn last_applied_annotation_is_masked_inside() {
        let p = secrets_plan();
        let applied = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s", "namespace": "e2e"},
            "data": {"k": "Q0FOQVJZ"}, "stringData": {"p": "CANARY-TEXT"}
        })
        .to_string();
        let body = serde_json::json!({
            "kind": "Secret",
            "metadata": {"name": "s", "annotations": {LAST_APPLIED: applied}},
            "data": {"k": "Q0FOQVJZ"}
        })
        .to_string();
        let out = mask(&p, &body);
        assert!(
            !out.contains("Q0FOQVJZ") && !out.contains("CANARY-TEXT"),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let inner: serde_json::Value =
            serde_json::from_str(v["metadata"]["annotations"][LAST_APPLIED].as_str().unwrap())
                .unwrap();
        assert_eq!(inner["data"]["k"], B64_PLACEHOLDER);
        assert_eq!(inner["metadata"]["namespace"], "e2e");
    }

    #[test]
    fn configmap_and_env_credentials_are_found_by_detectors_and_names() {
        let p = Arc::new(Plan::new(
            Vec::new(),
            Some(Arc::new(Detectors::new())),
            None,
        ));
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlc2lnbmF0dXJl";
        let body = serde_json::json!({
            "kind": "ConfigMap",
            "data": {
                "app.properties": "db.host=x\ndb.password=hunter2\nmode=fast",
                "key.pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----\nafter",
                "jwt": format!("Bearer {jwt}"),
                "aws": "AKIAIOSFODNN7EXAMPLE",
                "card": "paid with 4111 1111 1111 1111 today",
                "notcard": "4111 1111 1111 1112",
                "clientSecret": "s3cr3t-value",
                "secretName": "my-secret",
                "yaml": "token: abc.def\nuser: x",
            },
            "spec": {"containers": [{"env": [
                {"name": "DB_PASSWORD", "value": "hunter3"},
                {"name": "MODE", "value": "fast"}
            ]}]}
        })
        .to_string();
        let out = mask(&p, &body);
        for leaked in [
            "hunter2",
            "MIIEabc",
            jwt,
            "AKIAIOSFODNN7EXAMPLE",
            "4111 1111 1111 1111",
            "s3cr3t",
            "abc.def",
            "hunter3",
        ] {
            assert!(!out.contains(leaked), "{leaked} leaked: {out}");
        }
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["data"]["app.properties"],
            "db.host=x\ndb.password=[masked]\nmode=fast"
        );
        assert_eq!(v["data"]["key.pem"], "[masked:private-key]\nafter");
        assert_eq!(
            v["data"]["notcard"], "4111 1111 1111 1112",
            "fails Luhn: kept"
        );
        assert_eq!(
            v["data"]["secretName"], "my-secret",
            "a reference, not a value"
        );
        assert_eq!(v["spec"]["containers"][0]["env"][1]["value"], "fast");
    }

    #[test]
    fn configured_paths_and_fingerprints() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k");
        let p = Arc::new(Plan::new(
            vec![
                ("spec.connection.*".parse().unwrap(), Encoding::Text),
                (
                    "metadata.annotations[example.com/dsn]".parse().unwrap(),
                    Encoding::Text,
                ),
            ],
            None,
            Some(key),
        ));
        let body = r#"{"items":[{"metadata":{"annotations":{"example.com/dsn":"pg://u:CANARY@h","other":"x"}},"spec":{"connection":{"host":"CANARY1","port":5432},"keep":"y"}},{"spec":{"connection":{"host":"CANARY1"}}}]}"#;
        let out = mask(&p, body);
        assert!(!out.contains("CANARY"), "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let a = v["items"][0]["spec"]["connection"]["host"]
            .as_str()
            .unwrap();
        let b = v["items"][1]["spec"]["connection"]["host"]
            .as_str()
            .unwrap();
        assert!(a.starts_with("portcullis-masked:") && a == b, "{a} {b}");
        assert_eq!(v["items"][0]["spec"]["connection"]["port"], 0);
        assert_eq!(v["items"][0]["spec"]["keep"], "y");
        assert_eq!(v["items"][0]["metadata"]["annotations"]["other"], "x");
    }

    #[test]
    fn invalid_json_is_an_error_never_passed_through() {
        let p = secrets_plan();
        let mut m = JsonMasker::new(p.clone());
        assert!(matches!(
            m.feed(b"{\"data\":{\"k\":\"abc\"}}}"),
            Err(MaskError::Syntax { .. })
        ));
        let mut m = JsonMasker::new(p.clone());
        m.feed(b"{\"data\":{\"k\":\"ab").unwrap();
        assert!(m.finish().is_err());
        let mut m = JsonMasker::new(p.clone());
        assert!(m.feed(b"<html>").is_err());
        let mut m = JsonMasker::new(p.clone());
        assert_eq!(m.feed(&[b'['; MAX_DEPTH + 1]), Err(MaskError::TooDeep));
    }

    /// A `:` after a key and a `,` after a string or a closed container are taken with
    /// what precedes them when they are in the same chunk: the error at the byte after
    /// them is reported at the same offset, and what the comma moves on (an array's
    /// index, an object's next key) is the same, in every split of the body.
    #[test]
    fn a_colon_or_comma_taken_at_once_leaves_offsets_and_state_as_before() {
        let p = secrets_plan();
        let feed_split = |body: &[u8], at: usize| {
            let mut m = JsonMasker::new(p.clone());
            let mut out = m.feed(&body[..at])?;
            out.extend(m.feed(&body[at..])?);
            out.extend(m.finish()?);
            Ok::<_, MaskError>(out)
        };
        for (body, bad) in [
            (&b"[\"a\",x]"[..], 5),
            (b"[{},x]", 4),
            (b"[[],x]", 4),
            (b"{\"k\":\"v\",x}", 9),
            (b"{\"k\":x}", 5),
            (b"{\"k\":{},x}", 8),
        ] {
            for at in 0..=body.len() {
                assert_eq!(
                    feed_split(body, at),
                    Err(MaskError::Syntax {
                        offset: bad,
                        why: "unexpected character"
                    }),
                    "{} split at {at}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        // The comma moves an array's index on: a Secret list's second item is masked as
        // its first, and an object's next key is read as a key, in every split.
        let body = br#"{"kind":"SecretList","items":[{"kind":"Secret","data":{"a":"c2VjcmV0"}},{"kind":"Secret","data":{"b":"c2VjcmV0","c":"c2VjcmV0"}}]}"#;
        let whole = feed_split(body, body.len()).expect("masks");
        assert!(
            !String::from_utf8_lossy(&whole).contains("c2VjcmV0"),
            "{}",
            String::from_utf8_lossy(&whole)
        );
        for at in 0..=body.len() {
            assert_eq!(feed_split(body, at).as_ref(), Ok(&whole), "split at {at}");
        }
    }
}
