//! Container images without a registry: a root filesystem assembled from files of this
//! machine (static busybox, the built binaries, an interpreter and the shared libraries
//! each ELF file needs, found with `ldd`), written as a one-layer docker-archive and
//! imported into containerd with `ctr images import`. Pods use `imagePullPolicy: Never`.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

enum Entry {
    File { src: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    Dir,
    Symlink(PathBuf),
}

pub struct Image {
    pub tag: String,
    /// More names for the same image (e.g. the release name a base manifest uses).
    also: Vec<String>,
    entrypoint: Vec<String>,
    env: Vec<String>,
    entries: BTreeMap<PathBuf, Entry>,
}

fn is_elf(p: &Path) -> bool {
    let mut b = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
        && b == *b"\x7fELF"
}

/// The shared libraries (and the program interpreter) an ELF file loads, by `ldd`.
fn needed_libs(p: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(p).output().context("running ldd")?;
    // Static executables: "not a dynamic executable" (exit 1).
    if !out.status.success() {
        return Ok(Vec::new());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: a library is missing: {line}", p.display());
        }
        let path = match line.split_once("=>") {
            Some((_, right)) => right.trim().split(' ').next().unwrap_or(""),
            None => line.split(' ').next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

impl Image {
    pub fn new(tag: &str, entrypoint: &[&str]) -> Image {
        let mut img = Image {
            tag: tag.into(),
            also: Vec::new(),
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            entries: BTreeMap::new(),
        };
        for d in [
            "/bin", "/tmp", "/etc", "/proc", "/sys", "/dev", "/root", "/var/run",
        ] {
            img.dir(d);
        }
        img.bytes(
            "/etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            0o644,
        );
        img.bytes("/etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644);
        img
    }

    /// Another name for this image.
    pub fn also_tag(&mut self, tag: &str) -> &mut Self {
        self.also.push(tag.into());
        self
    }

    pub fn env(&mut self, kv: &str) -> &mut Self {
        self.env.push(kv.into());
        self
    }

    pub fn dir(&mut self, dest: impl AsRef<Path>) -> &mut Self {
        let mut p = PathBuf::new();
        for c in dest.as_ref().components() {
            p.push(c);
            if p != Path::new("/") {
                self.entries.entry(p.clone()).or_insert(Entry::Dir);
            }
        }
        self
    }

    fn parent_dirs(&mut self, dest: &Path) {
        if let Some(parent) = dest.parent() {
            self.dir(parent);
        }
    }

    pub fn bytes(&mut self, dest: impl AsRef<Path>, data: &[u8], mode: u32) -> &mut Self {
        let dest = dest.as_ref().to_path_buf();
        self.parent_dirs(&dest);
        self.entries.insert(
            dest,
            Entry::Bytes {
                data: data.to_vec(),
                mode,
            },
        );
        self
    }

    /// A file of this machine at `dest`; a symlink is followed (its target's content).
    pub fn file(&mut self, src: impl AsRef<Path>, dest: impl AsRef<Path>) -> Result<&mut Self> {
        use std::os::unix::fs::PermissionsExt;
        let src = src.as_ref();
        let meta = std::fs::metadata(src).with_context(|| format!("{}", src.display()))?;
        let dest = dest.as_ref().to_path_buf();
        self.parent_dirs(&dest);
        self.entries.insert(
            dest,
            Entry::File {
                src: src.to_path_buf(),
                mode: meta.permissions().mode() & 0o7777,
            },
        );
        Ok(self)
    }

    /// A file of this machine at the same absolute path.
    pub fn same_path(&mut self, src: impl AsRef<Path>) -> Result<&mut Self> {
        let src = src.as_ref().to_path_buf();
        self.file(&src, &src)
    }

    pub fn symlink(&mut self, dest: impl AsRef<Path>, target: impl AsRef<Path>) -> &mut Self {
        let dest = dest.as_ref().to_path_buf();
        self.parent_dirs(&dest);
        self.entries
            .insert(dest, Entry::Symlink(target.as_ref().to_path_buf()));
        self
    }

    /// A directory tree of this machine at `dest`, skipping entries whose file name is
    /// in `skip`. Symlinks inside are kept as symlinks.
    pub fn tree(&mut self, src: &Path, dest: &Path, skip: &[&str]) -> Result<&mut Self> {
        self.dir(dest);
        for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
            let e = e?;
            let name = e.file_name();
            if skip.iter().any(|s| name.to_str() == Some(s)) {
                continue;
            }
            let (from, to) = (e.path(), dest.join(&name));
            let ft = e.file_type()?;
            if ft.is_symlink() {
                self.symlink(&to, std::fs::read_link(&from)?);
            } else if ft.is_dir() {
                self.tree(&from, &to, skip)?;
            } else if ft.is_file() {
                self.file(&from, &to)?;
            }
        }
        Ok(self)
    }

    /// Static busybox as /bin/busybox with a symlink per applet (sh, tar, cat, ...).
    pub fn busybox(&mut self) -> Result<&mut Self> {
        let bb = Path::new("/bin/busybox");
        self.file(bb, bb)?;
        let out = Command::new(bb).arg("--list").output()?;
        for applet in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if applet != "busybox" {
                self.symlink(Path::new("/bin").join(applet), "busybox");
            }
        }
        Ok(self)
    }

    /// Adds the shared libraries every ELF file in the image needs, at the paths they
    /// have here (so the program interpreter finds them as it does on this machine).
    pub fn with_libraries(&mut self) -> Result<&mut Self> {
        let elfs: Vec<PathBuf> = self
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::File { src, .. } if is_elf(src) => Some(src.clone()),
                _ => None,
            })
            .collect();
        let mut wanted = std::collections::BTreeSet::new();
        for elf in &elfs {
            wanted.extend(needed_libs(elf)?);
        }
        for lib in wanted {
            if self.entries.contains_key(&lib) {
                continue;
            }
            // Keep the name the loader asks for; store the resolved file under it.
            let real = std::fs::canonicalize(&lib)?;
            self.file(&real, &lib)?;
        }
        Ok(self)
    }

    /// Writes the image as a docker-archive tarball (one layer) to `out`.
    pub fn write(&self, out: &Path) -> Result<()> {
        let layer_path = out.with_extension("layer.tar");
        {
            let f = std::fs::File::create(&layer_path)?;
            let mut b = tar::Builder::new(std::io::BufWriter::new(f));
            for (dest, entry) in &self.entries {
                let rel = dest.strip_prefix("/").unwrap_or(dest);
                let mut h = tar::Header::new_gnu();
                h.set_mtime(0);
                h.set_uid(0);
                h.set_gid(0);
                match entry {
                    Entry::Dir => {
                        h.set_entry_type(tar::EntryType::Directory);
                        h.set_mode(if rel == Path::new("tmp") {
                            0o1777
                        } else {
                            0o755
                        });
                        h.set_size(0);
                        b.append_data(&mut h, rel, std::io::empty())?;
                    }
                    Entry::Symlink(target) => {
                        h.set_entry_type(tar::EntryType::Symlink);
                        h.set_mode(0o777);
                        h.set_size(0);
                        b.append_link(&mut h, rel, target)?;
                    }
                    Entry::File { src, mode } => {
                        let f = std::fs::File::open(src)
                            .with_context(|| format!("{}", src.display()))?;
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_mode(*mode);
                        h.set_size(f.metadata()?.len());
                        b.append_data(&mut h, rel, f)?;
                    }
                    Entry::Bytes { data, mode } => {
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_mode(*mode);
                        h.set_size(data.len() as u64);
                        b.append_data(&mut h, rel, data.as_slice())?;
                    }
                }
            }
            b.into_inner()?.flush()?;
        }
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&layer_path)?, &mut hasher)?;
        let diff_id = format!("sha256:{}", hex(&hasher.finalize()));
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": self.entrypoint, "Env": self.env, "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        })
        .to_string();
        let manifest = serde_json::json!([{
            "Config": "config.json",
            "RepoTags": std::iter::once(&self.tag).chain(&self.also).collect::<Vec<_>>(),
            "Layers": ["layer.tar"],
        }])
        .to_string();
        let f = std::fs::File::create(out)?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(f));
        b.append_path_with_name(&layer_path, "layer.tar")?;
        for (name, data) in [("config.json", config), ("manifest.json", manifest)] {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data.as_bytes())?;
        }
        b.into_inner()?.flush()?;
        std::fs::remove_file(&layer_path)?;
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The Portcullis image: the `portcullis` binary (daemon, node setup, CLI) and the
/// libraries it loads, nothing else (no shell). `tags`: the names it is imported as.
pub fn portcullis(binary: &Path, tags: &[&str]) -> Result<Image> {
    let (first, rest) = tags.split_first().context("an image needs a name")?;
    let mut img = Image::new(first, &["/usr/local/bin/portcullis"]);
    for t in rest {
        img.also_tag(t);
    }
    img.file(binary, "/usr/local/bin/portcullis")?;
    img.dir("/var/lib/portcullis").dir("/etc/portcullis");
    img.with_libraries()?;
    Ok(img)
}
