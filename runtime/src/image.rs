//! The image format: one file per process (and one for the session), written as a stream
//! so that it can go to a file or straight to another host.
//!
//! ```text
//! header   4096 bytes: magic "MIGSHIM\0", format version, kind, crc of those 16 bytes
//! section  32-byte head: tag, flags, payload length, payload crc32, crc32 of the head
//!          padding to the payload's alignment (4096 for page data, so it can be mapped)
//!          payload
//! ...
//! END      payload: the number of sections before it
//! ```
//!
//! Every byte is covered by a checksum; a reader refuses a damaged, truncated or foreign
//! image before anything is used, naming the file, the section and the offset.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, Read, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 8] = *b"MIGSHIM\0";
pub const VERSION: u32 = 7;
pub const PAGE: usize = 4096;
const HEAD: usize = 32;

/// What an image file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Process = 1,
    Session = 2,
    /// Pages sent ahead of a process image while the process ran (a pre-copy round):
    /// PageMap/PageData pairs only.
    Pages = 3,
}

/// Section tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    /// postcard(ProcessMeta) or postcard(SessionManifest)
    Meta = 1,
    /// postcard((table::ProcessTable, table::Folded)): the reconciled table and the
    /// journal's intent behind it
    Table = 2,
    /// postcard(Vec<ThreadState>)
    Threads = 3,
    /// postcard(Vec<Region>), written after the pages: the address space as it is once
    /// they are written (what the restore recreates)
    Regions = 4,
    /// postcard(PageMap): which pages of a region follow
    PageMap = 5,
    /// the present pages of the preceding PageMap, page-aligned in the file
    PageData = 6,
    /// postcard(Vec<(u64, Bytes)>): unread bytes of the pipes the process reads from, by
    /// session-wide pipe id
    Pipes = 7,
    /// postcard(Vec<sockstate::SocketState>): unread bytes and options of its sockets
    Sockets = 8,
    /// postcard(Vec<(u64, Bytes)>): the content of files that exist nowhere else (memfds,
    /// files deleted while open), by inode
    Contents = 9,
    /// postcard(Vec<PtyState>): the pseudo-terminals whose master it holds
    Ptys = 10,
    /// postcard(Precopied): the image's memory is partly in pre-copy rounds
    Precopied = 11,
    /// postcard(Vec<HostFile>): the POSIX shared memory objects it holds or maps (their
    /// content goes in Contents)
    HostFiles = 12,
    /// postcard(Vec<SharedPart>): in a pre-copy round, the objects its shared memory's
    /// pages belong to
    Shared = 13,
    End = 0x454e44,
}

impl Tag {
    fn from_u32(v: u32) -> Option<Tag> {
        Some(match v {
            1 => Tag::Meta,
            2 => Tag::Table,
            3 => Tag::Threads,
            4 => Tag::Regions,
            5 => Tag::PageMap,
            6 => Tag::PageData,
            7 => Tag::Pipes,
            8 => Tag::Sockets,
            9 => Tag::Contents,
            10 => Tag::Ptys,
            11 => Tag::Precopied,
            12 => Tag::HostFiles,
            13 => Tag::Shared,
            0x454e44 => Tag::End,
            _ => return None,
        })
    }

    fn align(self) -> u64 {
        if self == Tag::PageData {
            PAGE as u64
        } else {
            8
        }
    }
}

/// A process as the image describes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessMeta {
    pub vpid: i32,
    pub parent_vpid: i32,
    pub real_pid: i32,
    pub host: String,
    pub command: Vec<crate::record::Bytes>,
    pub exe: crate::record::Bytes,
    pub cwd: crate::record::Bytes,
    pub umask: u32,
    /// Seconds since the epoch.
    pub taken: u64,
    /// Where the restorer hands over: the shim's restart path in the restored memory.
    pub restart_entry: u64,
    /// The main thread's saved context (its signal frame on its own stack) and TLS base.
    pub main_ucontext: u64,
    pub main_fs_base: u64,
    /// Offset of glibc's cached tid from the TLS base (found against gettid at freeze).
    pub tid_offset: u32,
    /// The kernel's view of the address space (prctl_mm_map order: start_code, end_code,
    /// start_data, end_data, start_brk, brk, start_stack, arg_start, arg_end, env_start,
    /// env_end), so that ps shows the original command line again.
    pub mm: Vec<u64>,
    pub auxv: Vec<u8>,
    /// The thread name (comm).
    pub comm: String,
    /// The terminal its stdio was, if any.
    pub tty: Option<TtyState>,
    /// An fd that is its controlling terminal, when it holds one open.
    pub ctty_fd: Option<i32>,
    /// The System V shared memory segments it has attached.
    pub sysv: Vec<SysvSegment>,
}

/// A System V shared memory segment, as /proc/sysvipc/shm describes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SysvSegment {
    pub key: i32,
    /// The kernel's id (a mapping's inode), and the id the app knows it by.
    pub id: i32,
    pub app_id: i32,
    /// Permission bits, with SHM_DEST (0o1000) when it is marked for removal.
    pub mode: u32,
    pub size: u64,
    /// How many attachments it has (nattch).
    pub attached: u32,
}

/// A terminal as a process left it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TtyState {
    /// `struct termios` as tcgetattr gave it.
    pub termios: Vec<u8>,
    pub rows: u16,
    pub cols: u16,
    /// Whether the process's group was the terminal's foreground group.
    pub foreground: bool,
}

/// A pseudo-terminal of the session (its master held by a process of it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PtyState {
    /// Its number (/dev/pts/N) at the checkpoint.
    pub index: u32,
    /// Modes and window size.
    pub tty: TtyState,
    /// Output the program on the terminal wrote that the master's holder had not read.
    pub output: crate::record::Bytes,
}

/// One thread, frozen.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadState {
    pub vtid: i32,
    pub tid: i32,
    /// Where its saved context lies (its signal frame, on its own stack).
    pub ucontext_addr: u64,
    /// The `ucontext_t` the kernel saved when the freeze signal arrived.
    pub ucontext: Vec<u8>,
    /// The FPU/vector state it points to (xsave area).
    pub fpstate: Vec<u8>,
    pub fs_base: u64,
    /// sigaltstack: (base, size, flags)
    pub altstack: (u64, u64, i32),
}

/// One mapping of the address space.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// "rwxp" as /proc/PID/maps shows it.
    pub perms: String,
    pub offset: u64,
    /// The file or the kernel's name ("[heap]", "[stack]"), empty for anonymous memory.
    pub name: crate::record::Bytes,
    pub inode: u64,
    /// For a region mapped from a file: the file's size and modification time (ns) at the
    /// checkpoint, so that a restore notices a file that changed since.
    pub file_size: u64,
    pub file_mtime_ns: i64,
    /// Whether the region's pages are in the image (else it is recreated from its file or
    /// left empty).
    pub stored: bool,
}

/// `count` pages from address `start`: bit i of `present` says page i is in the PageData
/// section that follows (zero pages are not stored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PageMap {
    pub start: u64,
    pub count: u64,
    pub present: Vec<u64>,
}

impl PageMap {
    pub fn is_present(&self, i: u64) -> bool {
        self.present
            .get((i / 64) as usize)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    pub fn present_count(&self) -> u64 {
        self.present.iter().map(|w| w.count_ones() as u64).sum()
    }
}

/// A process image's file name in a session image: its vpid after this.
pub const PROCESS_PREFIX: &str = "proc-";

pub fn process_file(vpid: i32) -> String {
    format!("{PROCESS_PREFIX}{vpid}.img")
}

/// A process image whose memory was sent ahead in rounds while it ran: its own page data
/// holds the pages written since the last round; the pages of `kept` are as the latest
/// round that holds them has them, or zero if none does; a page in neither is zero.
/// The round name that stands for "still in the source process" (`mig migrate --mode lazy`):
/// those pages are fetched from the frozen source while the restored session runs.
pub const SOURCE_ROUND: &str = "@source";

/// Whether a private mapping of this name is memory a lazy restore's pager fills in:
/// anonymous (not a file's), and not the stack (it holds the command line, which `ps` reads
/// from the process's memory and cannot fault in).
/// Anonymous memory holding this little is copied in whole, before the process runs, even
/// by a lazy restore (and a lazy migration sends it with the image): what a restored
/// process touches first is often there (its TLS, the heap's head), and a page fetched
/// then, from the pager or from afar, is a round trip before it is back.
pub const SMALL_REGION: u64 = 256 << 10;

/// A file that is memory of this host rather than data: a POSIX shared memory object
/// (shm_open, sem_open: /dev/shm). One the session holds or maps goes with its image, and
/// is made again where it is missing (another host).
pub fn host_memory_file(path: &[u8]) -> bool {
    path.starts_with(b"/dev/shm/") && !path.ends_with(b" (deleted)")
}

/// Such a file as it was: its name and owner (its content is in Contents, by inode).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostFile {
    pub ino: u64,
    pub path: crate::record::Bytes,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A shared mapping of memory that exists nowhere else (MAP_SHARED|MAP_ANONYMOUS, a memfd,
/// a deleted file; not System V): the restore makes it once for all the processes that map
/// it, from the pages their images hold of it.
pub fn shared_anonymous(perms: &str, name: &[u8]) -> bool {
    perms.ends_with('s')
        && !name.starts_with(b"/SYSV")
        && (name.starts_with(b"/dev/zero")
            || name.starts_with(b"/memfd:")
            || name.ends_with(b" (deleted)"))
}

/// Of each process (their mappings, in the order of their images), the ranges of shared
/// anonymous memory whose pages an image before its own holds already — a mapping of the
/// same object covering the same part of it — so that its image leaves them out.
pub fn shared_stored_before(processes: &[Vec<crate::procfs::MapsLine>]) -> Vec<Vec<(u64, u64)>> {
    // Per object (inode): the parts of it stored so far (offset ranges).
    let mut stored: std::collections::HashMap<u64, Vec<(u64, u64)>> = Default::default();
    processes
        .iter()
        .map(|maps| {
            let mut skip = Vec::new();
            for m in maps
                .iter()
                .filter(|m| shared_anonymous(&m.perms, &m.name.0))
            {
                let part = (m.offset, m.offset + (m.end - m.start));
                let parts = stored.entry(m.inode).or_default();
                if parts.iter().any(|&(s, e)| s <= part.0 && part.1 <= e) {
                    skip.push((m.start, m.end));
                } else {
                    parts.push(part);
                }
            }
            skip
        })
        .collect()
}

/// shared_stored_before for the processes `pids` as they are mapped now.
pub fn shared_stored_before_now(pids: impl Iterator<Item = i32>) -> Vec<Vec<(u64, u64)>> {
    let maps: Vec<_> = pids
        .map(|p| crate::procfs::all_mappings(&p.to_string()))
        .collect();
    shared_stored_before(&maps)
}

pub fn pageable(name: &[u8]) -> bool {
    name.first() != Some(&b'/') && name != b"[stack]"
}

/// Addresses [start, end) of a process mapping shared anonymous object `inode` from
/// `offset` on (Tag::Shared).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedPart {
    pub start: u64,
    pub end: u64,
    pub inode: u64,
    pub offset: u64,
}

/// The parts of `maps` (a process's mappings) behind the shared anonymous memory at
/// `ranges`.
pub fn shared_parts(maps: &[crate::procfs::MapsLine], ranges: &[(u64, u64)]) -> Vec<SharedPart> {
    let mut parts = Vec::new();
    for m in maps
        .iter()
        .filter(|m| shared_anonymous(&m.perms, &m.name.0))
    {
        for &(s, e) in ranges {
            let (start, end) = (s.max(m.start), e.min(m.end));
            if start < end {
                let offset = m.offset + (start - m.start);
                parts.push(SharedPart {
                    start,
                    end,
                    inode: m.inode,
                    offset,
                });
            }
        }
    }
    parts
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Precopied {
    /// The rounds' files (Kind::Pages, beside the image), oldest first.
    pub rounds: Vec<String>,
    /// Address ranges (start, end).
    pub kept: Vec<(u64, u64)>,
}

/// The session image's manifest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionManifest {
    pub name: String,
    pub host: String,
    pub taken: u64,
    /// (vpid, parent vpid, file name) of every process.
    pub processes: Vec<(i32, i32, String)>,
    /// fds that are one open file (crate::sharing).
    pub shared: crate::sharing::Shared,
}

fn pad(offset: u64, align: u64) -> u64 {
    (align - offset % align) % align
}

/// Writes an image as a stream.
pub struct ImageWriter<W: Write> {
    w: W,
    offset: u64,
    sections: u64,
}

impl<W: Write> ImageWriter<W> {
    pub fn new(mut w: W, kind: Kind) -> std::io::Result<Self> {
        let mut head = [0u8; PAGE];
        head[..8].copy_from_slice(&MAGIC);
        head[8..12].copy_from_slice(&VERSION.to_le_bytes());
        head[12..16].copy_from_slice(&(kind as u32).to_le_bytes());
        let crc = crc32fast::hash(&head[..16]);
        head[16..20].copy_from_slice(&crc.to_le_bytes());
        w.write_all(&head)?;
        Ok(ImageWriter {
            w,
            offset: PAGE as u64,
            sections: 0,
        })
    }

    /// A section whose payload is `parts`, one after another (page data is written
    /// straight from memory, without copying it together first).
    pub fn section_parts(&mut self, tag: Tag, parts: &[&[u8]]) -> std::io::Result<()> {
        let mut h = crc32fast::Hasher::new();
        let mut len = 0u64;
        for p in parts {
            h.update(p);
            len += p.len() as u64;
        }
        let mut head = [0u8; HEAD];
        head[0..4].copy_from_slice(&(tag as u32).to_le_bytes());
        head[8..16].copy_from_slice(&len.to_le_bytes());
        head[16..20].copy_from_slice(&h.finalize().to_le_bytes());
        let hc = crc32fast::hash(&head[..20]);
        head[20..24].copy_from_slice(&hc.to_le_bytes());
        self.w.write_all(&head)?;
        self.offset += HEAD as u64;
        let gap = pad(self.offset, tag.align()) as usize;
        self.w.write_all(&[0u8; PAGE][..gap])?;
        self.offset += gap as u64;
        write_all_vectored(&mut self.w, parts)?;
        self.offset += len;
        self.sections += 1;
        Ok(())
    }

    pub fn section(&mut self, tag: Tag, payload: &[u8]) -> std::io::Result<()> {
        self.section_parts(tag, &[payload])
    }

    pub fn postcard<T: Serialize>(&mut self, tag: Tag, value: &T) -> Result<()> {
        let bytes = postcard::to_stdvec(value)?;
        self.section(tag, &bytes)
            .map_err(|e| Error::io("writing image section", PathBuf::new(), e))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.offset
    }

    /// Writes the END section and hands back the writer (flushed).
    pub fn finish(mut self) -> std::io::Result<W> {
        let n = self.sections;
        self.section(Tag::End, &n.to_le_bytes())?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// write_all for many slices, in as few system calls as the writer allows. Allocates
/// nothing (a checkpoint writes pages while the app is frozen, and must not change memory
/// it is still dumping).
fn write_all_vectored(w: &mut impl Write, parts: &[&[u8]]) -> std::io::Result<()> {
    const BATCH: usize = 64;
    if let [one] = parts {
        return w.write_all(one);
    }
    for chunk in parts.chunks(BATCH) {
        let mut slices = [IoSlice::new(&[]); BATCH];
        for (s, p) in slices.iter_mut().zip(chunk) {
            *s = IoSlice::new(p);
        }
        let mut bufs = &mut slices[..chunk.len()];
        while !bufs.is_empty() {
            match w.write_vectored(bufs) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// A verified section.
#[derive(Debug)]
pub struct Section {
    pub tag: Tag,
    pub offset: u64,
    pub payload: Vec<u8>,
    /// Page data left unverified (ImageReader::defer_page_checks): its length and the
    /// checksum it must have, for whoever reads it later.
    pub unchecked: Option<(u64, u32)>,
}

impl Section {
    pub fn decode<'a, T: Deserialize<'a>>(&'a self, path: &Path) -> Result<T> {
        postcard::from_bytes(&self.payload).map_err(|e| Error::Image {
            path: path.into(),
            what: format!(
                "section {:?} at offset {} does not decode: {e}",
                self.tag, self.offset
            ),
        })
    }
}

/// Where an image is read from. When verifying, page data is only checksummed: a mapped
/// file is checksummed where it lies; anything else is read through a buffer.
pub trait Source: Read {
    /// The crc32 of the next `len` bytes, which are consumed.
    fn crc_of_next(&mut self, len: usize) -> std::io::Result<u32> {
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; (1 << 20).min(len)];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            self.read_exact(&mut buf[..n])?;
            h.update(&buf[..n]);
            left -= n;
        }
        Ok(h.finalize())
    }

    /// Passes over the next `len` bytes.
    fn skip(&mut self, len: usize) -> std::io::Result<()> {
        self.crc_of_next(len).map(drop)
    }
}

impl Source for std::io::BufReader<std::fs::File> {}

impl Source for &[u8] {
    fn crc_of_next(&mut self, len: usize) -> std::io::Result<u32> {
        if self.len() < len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let (head, rest) = self.split_at(len);
        *self = rest;
        Ok(crc32fast::hash(head))
    }

    fn skip(&mut self, len: usize) -> std::io::Result<()> {
        if self.len() < len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        *self = &self[len..];
        Ok(())
    }
}

/// Reads an image, verifying every checksum as it goes.
pub struct ImageReader<R: Read> {
    r: R,
    path: PathBuf,
    offset: u64,
    sections: u64,
    pub kind: Kind,
    done: bool,
    /// Page data is checked and dropped, not kept (a restore maps it from the file).
    skip_page_data: bool,
    /// Page data is not even checked (left to whoever reads it: Section::unchecked).
    defer_page_checks: bool,
}

impl ImageReader<std::io::BufReader<std::fs::File>> {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io("opening image", path, e))?;
        ImageReader::new(std::io::BufReader::with_capacity(1 << 20, f), path)
    }
}

impl<R: Source> ImageReader<R> {
    pub fn new(mut r: R, path: &Path) -> Result<Self> {
        let bad = |what: String| Error::Image {
            path: path.into(),
            what,
        };
        let mut head = [0u8; PAGE];
        read_exact(&mut r, &mut head).map_err(|_| bad("truncated: no complete header".into()))?;
        if head[..8] != MAGIC {
            return Err(bad("not a migshim image (bad magic)".into()));
        }
        if u32::from_le_bytes(head[16..20].try_into().unwrap()) != crc32fast::hash(&head[..16])
            || head[20..].iter().any(|&b| b != 0)
        {
            return Err(bad("damaged header (checksum mismatch)".into()));
        }
        let version = u32::from_le_bytes(head[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}; this mig reads version {VERSION}: restore it with the mig that wrote it"
            )));
        }
        let kind = match u32::from_le_bytes(head[12..16].try_into().unwrap()) {
            1 => Kind::Process,
            2 => Kind::Session,
            3 => Kind::Pages,
            k => return Err(bad(format!("unknown image kind {k}"))),
        };
        Ok(ImageReader {
            r,
            path: path.into(),
            offset: PAGE as u64,
            sections: 0,
            kind,
            done: false,
            skip_page_data: false,
            defer_page_checks: false,
        })
    }

    /// From now on, PageData sections are verified as they stream by but their payload is
    /// not kept (the Section comes back with an empty payload).
    pub fn skip_page_data(mut self) -> Self {
        self.skip_page_data = true;
        self
    }

    /// From now on, PageData sections are passed over unverified (Section::unchecked says
    /// what their checksum must be).
    pub fn defer_page_checks(mut self) -> Self {
        self.skip_page_data = true;
        self.defer_page_checks = true;
        self
    }

    fn bad(&self, what: String) -> Error {
        Error::Image {
            path: self.path.clone(),
            what,
        }
    }

    /// The next section, verified; None after a verified END.
    pub fn next_section(&mut self) -> Result<Option<Section>> {
        if self.done {
            return Ok(None);
        }
        let at = self.offset;
        let mut head = [0u8; HEAD];
        read_exact(&mut self.r, &mut head).map_err(|_| {
            self.bad(format!(
                "truncated at offset {at}: section {} missing",
                self.sections + 1
            ))
        })?;
        let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
        if u32_at(20) != crc32fast::hash(&head[..20]) || head[24..].iter().any(|&b| b != 0) {
            return Err(self.bad(format!(
                "damaged section head at offset {at} (checksum mismatch)"
            )));
        }
        let tag = Tag::from_u32(u32_at(0))
            .ok_or_else(|| self.bad(format!("unknown section tag {} at offset {at}", u32_at(0))))?;
        let len = u64::from_le_bytes(head[8..16].try_into().unwrap());
        self.offset += HEAD as u64;
        let gap = pad(self.offset, tag.align());
        let mut skip = [0u8; PAGE];
        read_exact(&mut self.r, &mut skip[..gap as usize])
            .map_err(|_| self.bad(format!("truncated in section {tag:?} at offset {at}")))?;
        if skip[..gap as usize].iter().any(|&b| b != 0) {
            return Err(self.bad(format!("damaged padding in section {tag:?} at offset {at}")));
        }
        self.offset += gap;
        if len > 1 << 40 {
            return Err(self.bad(format!("section {tag:?} at offset {at} claims {len} bytes")));
        }
        let truncated =
            || format!("truncated in section {tag:?} at offset {at} ({len} bytes expected)");
        let deferred = tag == Tag::PageData && self.defer_page_checks;
        let (payload, crc) = if deferred {
            self.r
                .skip(len as usize)
                .map_err(|_| self.bad(truncated()))?;
            (Vec::new(), u32_at(16))
        } else if tag == Tag::PageData && self.skip_page_data {
            let crc = self
                .r
                .crc_of_next(len as usize)
                .map_err(|_| self.bad(truncated()))?;
            (Vec::new(), crc)
        } else {
            let mut payload = vec![0u8; len as usize];
            read_exact(&mut self.r, &mut payload).map_err(|_| self.bad(truncated()))?;
            let crc = crc32fast::hash(&payload);
            (payload, crc)
        };
        if crc != u32_at(16) {
            return Err(self.bad(format!(
                "damaged section {tag:?} at offset {at} (checksum mismatch)"
            )));
        }
        self.offset += len;
        if tag == Tag::End {
            let n = payload
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
            if n != Some(self.sections) {
                return Err(self.bad(format!(
                    "END says {n:?} sections, {} were read",
                    self.sections
                )));
            }
            self.done = true;
            return Ok(None);
        }
        self.sections += 1;
        Ok(Some(Section {
            tag,
            offset: at,
            payload,
            unchecked: deferred.then_some((len, crc)),
        }))
    }
}

/// The checksum a section's payload carries (Section::unchecked).
pub fn checksum(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<()> {
    r.read_exact(buf)
}

/// Reads a whole image, verifying it, and returns its sections.
pub fn read_all(path: &Path) -> Result<(Kind, Vec<Section>)> {
    read_sections(ImageReader::open(path)?)
}

/// Verifies a whole image; page data is checked but not kept (checksummed in place, the
/// file mapped: no copy of gigabytes through a buffer). With `defer_page_checks`, page data
/// is not read at all: its sections say what it must be (Section::unchecked).
pub fn read_verified_metadata(
    path: &Path,
    defer_page_checks: bool,
) -> Result<(Kind, Vec<Section>)> {
    let f = std::fs::File::open(path).map_err(|e| Error::io("opening image", path, e))?;
    let mapped = crate::sys::MappedFile::new(&f, !defer_page_checks)
        .map_err(|e| Error::io("mapping image", path, e))?;
    let r = ImageReader::new(mapped.bytes(), path)?;
    read_sections(match defer_page_checks {
        true => r.defer_page_checks(),
        false => r.skip_page_data(),
    })
}

fn read_sections<R: Source>(mut r: ImageReader<R>) -> Result<(Kind, Vec<Section>)> {
    let mut out = Vec::new();
    while let Some(s) = r.next_section()? {
        out.push(s);
    }
    Ok((r.kind, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = ImageWriter::new(Vec::new(), Kind::Process).unwrap();
        w.postcard(
            Tag::Meta,
            &ProcessMeta {
                vpid: 4200001,
                ..Default::default()
            },
        )
        .unwrap();
        let page = [7u8; PAGE];
        let map = PageMap {
            start: 0x1000,
            count: 3,
            present: vec![0b101],
        };
        w.postcard(Tag::PageMap, &map).unwrap();
        w.section_parts(Tag::PageData, &[&page, &page]).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_and_alignment() {
        let img = sample();
        let mut r = ImageReader::new(&img[..], Path::new("x")).unwrap();
        assert_eq!(r.kind, Kind::Process);
        let meta = r.next_section().unwrap().unwrap();
        assert_eq!(
            meta.decode::<ProcessMeta>(Path::new("x")).unwrap().vpid,
            4200001
        );
        let map: PageMap = r
            .next_section()
            .unwrap()
            .unwrap()
            .decode(Path::new("x"))
            .unwrap();
        assert!(map.is_present(0) && !map.is_present(1) && map.is_present(2));
        assert_eq!(map.present_count(), 2);
        let data = r.next_section().unwrap().unwrap();
        assert_eq!(data.payload.len(), 2 * PAGE);
        // The page data sits page-aligned in the file (so it can be mapped from there).
        let pos = img.windows(PAGE).position(|w| w == [7u8; PAGE]).unwrap();
        assert_eq!(pos % PAGE, 0);
        assert!(r.next_section().unwrap().is_none());
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let img = sample();
        let read = |b: &[u8]| -> Result<()> {
            let mut r = ImageReader::new(b, Path::new("img"))?;
            while r.next_section()?.is_some() {}
            Ok(())
        };
        assert!(read(&img).is_ok());
        // Every byte counts: header, heads, padding, payloads.
        for i in 0..img.len() {
            let mut bad = img.clone();
            bad[i] ^= 0x40;
            assert!(read(&bad).is_err(), "flipping byte {i} went unnoticed");
        }
        for cut in [0, 10, PAGE, PAGE + 5, img.len() / 2, img.len() - 1] {
            let e = read(&img[..cut]).unwrap_err().to_string();
            assert!(e.contains("img") && e.contains("truncated"), "{cut}: {e}");
        }
        let mut v2 = img.clone();
        v2[8] = (VERSION + 1) as u8;
        let crc = crc32fast::hash(&v2[..16]);
        v2[16..20].copy_from_slice(&crc.to_le_bytes());
        assert!(
            read(&v2)
                .unwrap_err()
                .to_string()
                .contains(&format!("format version {}", VERSION + 1))
        );
        assert!(
            read(b"hello")
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }
}
