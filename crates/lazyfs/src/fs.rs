//! The FUSE operations.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request, SessionACL,
};
use warren_image::{Entry, EntryKind, TreeIndex};
use warren_store::{ChunkFetcher, FetchError, HeldCopy, WHOLE_FILE_MIN, WholeFiles};

use crate::trace::Recorder;

/// The image never changes under a mount: the kernel may cache everything for long.
const TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Added to every uid and gid (the workspace's user namespace base); 0 on the host.
    pub id_offset: u32,
    /// On a miss, fetch up to this many bytes of the same file beyond the read.
    pub readahead: u64,
    /// FUSE worker threads (several requests in flight).
    pub threads: usize,
    /// Honor setuid bits (`suid`); see [`crate::serve::ServeRequest::setuid`].
    pub setuid: bool,
    /// Let the kernel read large files from their whole-file copies ([`WholeFiles`]) where it
    /// can (FUSE passthrough, Linux 6.9+), and make the copies.
    pub passthrough: bool,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            id_offset: 0,
            readahead: 1 << 20,
            threads: 4,
            setuid: true,
            passthrough: true,
        }
    }
}

struct Node {
    /// The entry this inode shows (for a hard link: the file it names).
    entry: usize,
    parent: u64,
    nlink: u32,
    /// Directories: children as (name, inode), sorted by name.
    children: Vec<(Vec<u8>, u64)>,
    /// Regular files: the end offset of each chunk, for finding the chunks of a range; known
    /// once the file is located (its first read, or a large file's first open).
    chunk_ends: OnceLock<Vec<u64>>,
    /// Regular files of [`WHOLE_FILE_MIN`] bytes or more: the name of their whole-file copy,
    /// and whether they were read through the mount to their end (then a copy is asked for
    /// at that read and whenever a file of theirs closes: the readahead still under way at
    /// the last read may not have landed yet).
    whole_key: OnceLock<String>,
    read_to_end: AtomicBool,
}

/// How the kernel reads an open large file. It refuses to mix the two on one inode (the open
/// fails with EIO), so while an inode has open files every new one is opened as they were.
enum FileIo {
    /// Through this server, by chunks: `opens` files open.
    Served { opens: u32 },
    /// From the file's whole-file copy, registered with the kernel as `backing`; held open
    /// (and so never dropped to make room) while the kernel reads from it.
    Copy {
        backing: fuser::BackingId,
        opens: u32,
        _held: HeldCopy,
    },
}

pub struct LazyFs {
    fetcher: Arc<ChunkFetcher>,
    nodes: Vec<Node>,
    options: MountOptions,
    recorder: Option<Arc<Recorder>>,
    /// Where whole-file copies are kept; `None` when the kernel does not read through to them
    /// (passthrough off, unsupported, or reads recorded for a trace).
    whole: Option<Arc<WholeFiles>>,
    /// Large files open now, by inode.
    file_io: Mutex<HashMap<u64, FileIo>>,
    /// The kernel refused a copy (its file system is itself stacked, say): every file is read
    /// through the mount, and no more copies are made.
    refused: AtomicBool,
    /// Files (entries) to make whole-file copies of, for one thread that makes them.
    copier: OnceLock<mpsc::Sender<usize>>,
    /// Entries queued for the copier or being copied.
    queued: Arc<Mutex<HashSet<usize>>>,
}

impl std::fmt::Debug for LazyFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFs")
            .field("inodes", &self.nodes.len())
            .finish()
    }
}

/// Inode numbers are entry positions + 1 (the root, entry 0, is inode 1 as FUSE wants).
fn ino_of(entry: usize) -> u64 {
    entry as u64 + 1
}

impl LazyFs {
    pub fn new(
        fetcher: Arc<ChunkFetcher>,
        options: MountOptions,
        recorder: Option<Arc<Recorder>>,
    ) -> LazyFs {
        let index = fetcher.index();
        let entries = &index.entries;
        // Hard links share their file's inode.
        let target_of = |i: usize| -> usize {
            if entries[i].kind == EntryKind::Hardlink {
                index.find(&entries[i].link).unwrap_or(i)
            } else {
                i
            }
        };
        let mut nodes: Vec<Node> = (0..entries.len())
            .map(|i| Node {
                entry: target_of(i),
                parent: 1,
                nlink: 1,
                children: Vec::new(),
                chunk_ends: OnceLock::new(),
                whole_key: OnceLock::new(),
                read_to_end: AtomicBool::new(false),
            })
            .collect();
        let mut by_path: HashMap<&[u8], usize> = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            by_path.insert(&e.path, i);
            if e.kind == EntryKind::Dir {
                nodes[i].nlink = 2;
            }
        }
        for (i, e) in entries.iter().enumerate().skip(1) {
            let parent = e
                .parent()
                .and_then(|p| by_path.get(p).copied())
                .unwrap_or(0);
            let target = target_of(i);
            nodes[parent]
                .children
                .push((e.name().to_vec(), ino_of(target)));
            nodes[i].parent = ino_of(parent);
            if e.kind == EntryKind::Dir {
                nodes[parent].nlink += 1;
            }
            if e.kind == EntryKind::Hardlink && target != i {
                nodes[target].nlink += 1;
            }
        }
        // Entries are sorted by path, so children are already sorted by name within a folder.
        // A recorded trace must see every read.
        let whole = (options.passthrough && recorder.is_none())
            .then(|| Arc::new(fetcher.cache().whole_files()));
        LazyFs {
            fetcher,
            nodes,
            options,
            recorder,
            whole,
            file_io: Mutex::new(HashMap::new()),
            refused: AtomicBool::new(false),
            copier: OnceLock::new(),
            queued: Arc::default(),
        }
    }

    fn index(&self) -> &TreeIndex {
        self.fetcher.index()
    }

    fn node(&self, ino: INodeNo) -> Option<&Node> {
        let i = u64::from(ino).checked_sub(1)?;
        self.nodes.get(usize::try_from(i).ok()?)
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let node = &self.nodes[(ino - 1) as usize];
        let e = &self.index().entries[node.entry];
        let kind = match e.kind {
            EntryKind::Dir => FileType::Directory,
            EntryKind::File | EntryKind::Hardlink => FileType::RegularFile,
            EntryKind::Symlink => FileType::Symlink,
            EntryKind::CharDevice => FileType::CharDevice,
            EntryKind::BlockDevice => FileType::BlockDevice,
            EntryKind::Fifo => FileType::NamedPipe,
            EntryKind::Socket => FileType::Socket,
        };
        let size = match e.kind {
            EntryKind::Symlink => e.link.len() as u64,
            EntryKind::Dir => 4096,
            _ => e.size,
        };
        let mtime = if e.mtime >= 0 {
            UNIX_EPOCH + Duration::new(e.mtime as u64, e.mtime_nsec)
        } else {
            UNIX_EPOCH
        };
        FileAttr {
            ino: INodeNo(ino_of(node.entry)),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (e.mode & 0o7777) as u16,
            nlink: node.nlink,
            uid: e.uid.saturating_add(self.options.id_offset),
            gid: e.gid.saturating_add(self.options.id_offset),
            rdev: e.rdev as u32,
            flags: 0,
            blksize: 4096,
        }
    }

    /// Looks up the chunks of the file `node` shows (`entry`) in the chunk table once, checked
    /// against the file's size: the end offset of each chunk and, for a file that may have a
    /// whole-file copy, the copy's name (set first, so it is there once the ends are).
    fn locate<'a>(&self, node: &'a Node, entry: &Entry) -> Result<&'a [u64], FetchError> {
        if let Some(ends) = node.chunk_ends.get() {
            return Ok(ends);
        }
        let locs = self.fetcher.file_locs(entry)?;
        if self.whole.is_some() && entry.size >= WHOLE_FILE_MIN {
            let _ = node
                .whole_key
                .set(WholeFiles::key(entry.size, locs.iter().map(|l| &l.id)));
        }
        let mut end = 0;
        let ends = locs
            .iter()
            .map(|l| {
                end += u64::from(l.len);
                end
            })
            .collect();
        Ok(node.chunk_ends.get_or_init(|| ends))
    }

    /// The name of the whole-file copy of the large file `node` shows.
    fn whole_key<'a>(&self, node: &'a Node, entry: &Entry) -> Result<Option<&'a str>, FetchError> {
        self.fetcher.on_demand(|| self.locate(node, entry))?;
        Ok(node.whole_key.get().map(String::as_str))
    }

    /// Asks the copier thread (started on the first call), if this mount makes copies, to make
    /// the whole-file copy of the file `node` shows if all its chunks are local by then.
    fn ask_for_copy(&self, node: &Node) {
        let Some(whole) = &self.whole else {
            return;
        };
        let entry = node.entry;
        if self.refused.load(Ordering::Relaxed)
            || !self.queued.lock().expect("queue lock").insert(entry)
        {
            return;
        }
        let copier = self.copier.get_or_init(|| {
            let (send, receive) = mpsc::channel::<usize>();
            let (fetcher, whole, queued) =
                (self.fetcher.clone(), whole.clone(), self.queued.clone());
            std::thread::Builder::new()
                .name("whole-files".into())
                .spawn(move || {
                    // Copies wait for every other reader of the disk: idle I/O priority
                    // (IOPRIO_WHO_PROCESS of this thread, IOPRIO_CLASS_IDLE).
                    // SAFETY: ioprio_set only changes this thread's I/O priority.
                    unsafe { libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13) };
                    // Ends when the file system is dropped (its sender with it).
                    for entry in receive {
                        let e = &fetcher.index().entries[entry];
                        match make_whole_copy(&fetcher, &whole, e) {
                            Ok(true) => {
                                fetcher
                                    .counters
                                    .whole_files_made
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(false) => {}
                            Err(err) => {
                                tracing::info!(path = %e.path_str(), error = %err, "cannot make a whole-file copy");
                            }
                        }
                        queued.lock().expect("queue lock").remove(&entry);
                    }
                })
                .expect("spawn the whole-file copier");
            send
        });
        if copier.send(entry).is_err() {
            self.queued.lock().expect("queue lock").remove(&entry);
        }
    }

    /// Opens a large file: from its whole-file copy when it has one and no file of its inode
    /// is open through the mount, else through the mount. Every open is counted, whichever
    /// way it goes, so that the next one goes the same way while any is open.
    fn open_large(
        &self,
        whole: &Arc<WholeFiles>,
        ino: u64,
        node: &Node,
        entry: &Entry,
        reply: ReplyOpen,
    ) {
        let key = if self.refused.load(Ordering::Relaxed) {
            None
        } else {
            self.whole_key(node, entry)
                .inspect_err(|err| tracing::debug!(path = %entry.path_str(), error = %err, "no whole-file copy: cannot locate the file's chunks"))
                .ok()
                .flatten()
        };
        let mut io = self.file_io.lock().expect("file io lock");
        match io.get_mut(&ino) {
            Some(FileIo::Copy { backing, opens, .. }) => {
                *opens += 1;
                return reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), backing);
            }
            Some(FileIo::Served { opens }) => *opens += 1,
            None => {
                let copy = key.and_then(|key| whole.open(key, entry.size));
                if let Some(copy) = copy {
                    match reply.open_backing(&copy.0) {
                        Ok(backing) => {
                            self.fetcher
                                .counters
                                .whole_file_opens
                                .fetch_add(1, Ordering::Relaxed);
                            // Answered under the lock: no other open of the inode meanwhile.
                            reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), &backing);
                            io.insert(
                                ino,
                                FileIo::Copy {
                                    backing,
                                    opens: 1,
                                    _held: copy,
                                },
                            );
                            return;
                        }
                        // The copy's file system is itself stacked (ELOOP), or passthrough is
                        // not allowed here: for good. Anything else (out of descriptors) is
                        // for this open only.
                        Err(err)
                            if matches!(
                                err.raw_os_error(),
                                Some(libc::ELOOP | libc::EPERM | libc::EOPNOTSUPP | libc::EINVAL)
                            ) =>
                        {
                            if !self.refused.swap(true, Ordering::Relaxed) {
                                self.fetcher
                                    .counters
                                    .passthrough
                                    .store(false, Ordering::Relaxed);
                                tracing::warn!(error = %err, "the kernel refused a whole-file copy: this mount reads every file through itself");
                            }
                        }
                        Err(err) => {
                            tracing::info!(path = %entry.path_str(), error = %err, "cannot hand a whole-file copy to the kernel; reading through the mount");
                        }
                    }
                }
                io.insert(ino, FileIo::Served { opens: 1 });
            }
        }
        drop(io);
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
    }

    /// Chunk positions (within the file's chunk list) covering `[offset, offset + len)`.
    fn chunk_span(ends: &[u64], offset: u64, len: u64) -> std::ops::Range<usize> {
        let first = ends.partition_point(|&end| end <= offset);
        let last = ends.partition_point(|&end| end < offset + len);
        first..(last + 1).min(ends.len())
    }
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        // Lets host root give each workspace an idmapped view of one shared mount (Linux
        // 6.12+; with `default_permissions`, which every mount has). Older kernels lack it.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ALLOW_IDMAP);
        // Passthrough makes this a stacked file system (depth 1, as overlayfs on a disk): a
        // workspace's overlay on it is at the kernel's limit of two.
        if self.whole.is_some()
            && (config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_err()
                || config.set_max_stack_depth(1).is_err())
        {
            tracing::info!(
                "this kernel cannot read files from their whole copies (FUSE passthrough, Linux 6.9+): every read goes through the mount"
            );
            self.whole = None;
        }
        self.fetcher
            .counters
            .passthrough
            .store(self.whole.is_some(), Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match dir
            .children
            .binary_search_by(|(n, _)| n.as_slice().cmp(name.as_bytes()))
        {
            Ok(i) => reply.entry(&TTL, &self.attr(dir.children[i].1), Generation(0)),
            Err(_) => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Some(_) => reply.attr(&TTL, &self.attr(ino.into())),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).map(|n| &self.index().entries[n.entry]) {
            Some(e) if e.kind == EntryKind::Symlink => reply.data(&e.link),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let entry = &self.index().entries[node.entry];
        if let Some(whole) = &self.whole
            && entry.kind == EntryKind::File
            && entry.size >= WHOLE_FILE_MIN
        {
            return self.open_large(whole, ino.into(), node, entry, reply);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
        let mut io = self.file_io.lock().expect("file io lock");
        let (opens, served) = match io.get_mut(&ino.into()) {
            Some(FileIo::Served { opens }) => (opens, true),
            Some(FileIo::Copy { opens, .. }) => (opens, false),
            None => return,
        };
        *opens -= 1;
        // The last one closed: the next open may use a copy (the kernel has let go of this
        // one's backing file before telling us).
        if *opens == 0 {
            io.remove(&ino.into());
        }
        drop(io);
        if served
            && let Some(node) = self.node(ino)
            && node.read_to_end.load(Ordering::Relaxed)
        {
            self.ask_for_copy(node);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let entry = &self.index().entries[node.entry];
        if offset >= entry.size || size == 0 {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(entry.size - offset);
        let ends = match self.fetcher.on_demand(|| self.locate(node, entry)) {
            Ok(ends) => ends,
            Err(err) => {
                tracing::error!(path = %entry.path_str(), error = %err, "cannot locate the file's chunks");
                return reply.error(Errno::EIO);
            }
        };
        let span = Self::chunk_span(ends, offset, len);
        let wanted: Vec<u32> = entry.chunks.range(span.clone()).collect();
        // Readahead: the following chunks of this file up to `readahead` bytes, fetched in the
        // same request if they are missing.
        let start_of_span = if span.start == 0 {
            0
        } else {
            ends[span.start - 1]
        };
        let until = ends[span.end - 1].saturating_add(self.options.readahead);
        let more = ends[span.end..].partition_point(|&end| end < until);
        let extra: Vec<u32> = entry.chunks.range(span.end..span.end + more + 1).collect();
        if let Some(rec) = &self.recorder {
            rec.record(&wanted);
        }
        let from = (offset - start_of_span) as usize;
        // One buffer per FUSE thread, reused: a read of 1 MiB allocates nothing.
        thread_local! {
            static SPAN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SPAN.with_borrow_mut(|data| {
            data.clear();
            match self.fetcher.read_into(&wanted, &extra, data) {
                Ok(()) => {
                    let to = (from + len as usize).min(data.len());
                    reply.data(&data[from.min(to)..to]);
                    // Read to its end through the mount: a copy once every chunk is local.
                    if offset + len == entry.size && entry.size >= WHOLE_FILE_MIN {
                        node.read_to_end.store(true, Ordering::Relaxed);
                        self.ask_for_copy(node);
                    }
                }
                Err(err) => {
                    tracing::error!(path = %entry.path_str(), offset, error = %err, "read failed");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    /// No file ioctls (overlayfs asks for the inode flags of every file it copies up): the
    /// answer a plain file system gives, without fuser's "not implemented" warning per call.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Some(n) if self.index().entries[n.entry].kind == EntryKind::Dir => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let dots = [
            (b".".to_vec(), u64::from(ino)),
            (b"..".to_vec(), dir.parent),
        ];
        for (i, (name, child)) in dots
            .iter()
            .chain(&dir.children)
            .enumerate()
            .skip(offset as usize)
        {
            let kind = if i < 2 {
                FileType::Directory
            } else {
                self.attr(*child).kind
            };
            if reply.add(
                INodeNo(*child),
                (i + 1) as u64,
                kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.index().data_bytes().div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.nodes.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let e = &self.index().entries[node.entry];
        match e
            .xattrs
            .iter()
            .find(|(n, _)| n.as_bytes() == name.as_bytes())
        {
            None => reply.error(Errno::ENODATA),
            Some((_, v)) if size == 0 => reply.size(v.len() as u32),
            Some((_, v)) if v.len() <= size as usize => reply.data(v),
            Some(_) => reply.error(Errno::ERANGE),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for (n, _) in &self.index().entries[node.entry].xattrs {
            list.extend_from_slice(n.as_bytes());
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32);
        } else if list.len() <= size as usize {
            reply.data(&list);
        } else {
            reply.error(Errno::ERANGE);
        }
    }
}

/// Makes the whole-file copy of `entry` if all its chunks are in the cache and there is no copy
/// yet; true if it made one.
fn make_whole_copy(
    fetcher: &ChunkFetcher,
    whole: &WholeFiles,
    entry: &Entry,
) -> Result<bool, String> {
    let locs = fetcher.file_locs(entry).map_err(|e| e.to_string())?;
    let cache = fetcher.cache();
    let key = WholeFiles::key(entry.size, locs.iter().map(|l| &l.id));
    if !locs.iter().all(|l| cache.contains(&l.id)) || whole.exists(&key) {
        return Ok(false);
    }
    // A file mostly of repeated chunks (zeros, a sparse disk image) costs the cache little and
    // its copy its whole size: not worth it, and not a lever for writing the host's disk.
    let mut seen = HashSet::new();
    let distinct: u64 = locs
        .iter()
        .filter(|l| seen.insert(l.id))
        .map(|l| u64::from(l.len))
        .sum();
    if distinct < entry.size / 2 {
        return Ok(false);
    }
    let mut chunk = Vec::new();
    whole
        .make(&key, entry.size, |file| {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            for l in &locs {
                chunk.clear();
                if !cache.read_into(&l.id, &mut chunk) {
                    return Err(std::io::Error::other(format!(
                        "chunk {} left the cache",
                        l.id
                    )));
                }
                out.write_all(&chunk)?;
            }
            out.flush()
        })
        .map_err(|e| e.to_string())
}

/// Mounts `fs` read-only at `mountpoint` in the background; unmounted when the session drops.
pub fn mount(fs: LazyFs, mountpoint: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let threads = fs.options.threads;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("warren".into()),
        MountOption::Subtype("warren-image".into()),
        MountOption::DefaultPermissions,
        // Never `dev`: a device node in an image (it is a tenant's) must not open a device of
        // the host. Setuid stays where ids are shifted (inside, it raises a process only to
        // the workspace's root), not on a host's shared mount (its root is host root).
        MountOption::NoDev,
        if fs.options.setuid {
            MountOption::Suid
        } else {
            MountOption::NoSuid
        },
        MountOption::Exec,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    widen_readahead(mountpoint);
    Ok(session)
}

/// FUSE asks for `max_readahead` at init but the kernel caps it at the mount's default of
/// 128 KiB: a sequential read then costs a request per 128 KiB, one after another. The cap is the
/// mount's `read_ahead_kb` in sysfs (writable by root). At 8 MiB a sequential read keeps eight
/// 1 MiB requests in flight, and the cache's disk reads overlap the hashing and copying of the
/// requests before them: a cold read of a cached 256 MiB file ran at 1.8 GB/s against 1.25 GB/s
/// with 1 MiB (4 MiB: 1.65, 16 MiB: 1.5). The window only grows that far for reads in order.
fn widen_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(e) = std::fs::write(&path, "8192") {
        tracing::debug!(path, error = %e, "cannot raise the mount's readahead");
    }
}
