//! Builds the table a reader gets: the folded journal reconciled with /proc/self — the
//! kernel's word on which fds exist and what they are now (offsets, counters, addresses),
//! and which threads run. Runs on the control thread.

use crate::control::{control_tid, is_shim_fd};
use crate::interpose::{real_pgid_sid, real_pid};
use crate::state::{journal, shim, vpid};
use migrt::procfs;
use migrt::sessiontable::Kind;
use migrt::table::{FdEntry, Object, Opened, ProcessTable, ThreadEntry};
use migrt::wire::JournalView;

pub fn table(with_journal: bool) -> (ProcessTable, Option<JournalView>) {
    let Some(s) = shim() else {
        return (ProcessTable::default(), None);
    };
    let (folded, view) = {
        let j = journal(s);
        let view = with_journal.then(|| JournalView {
            appended: j.appended(),
            recent: j.recent(),
        });
        (j.folded().clone(), view)
    };
    let me = vpid();
    let real = real_pid();
    let to_v = |r: i32| s.table.vid_of(r).unwrap_or(r);
    let (pgid, sid) = real_pgid_sid();
    let mut t = ProcessTable {
        vpid: me,
        real_pid: real,
        parent_vpid: s.table.get(me).map_or(0, |e| e.parent),
        pgid: to_v(pgid),
        sid: to_v(sid),
        command: procfs::cmdline(real),
        ..Default::default()
    };

    let ctl = control_tid();
    for tid in procfs::list_tasks("self") {
        if tid == ctl {
            continue;
        }
        let vtid = if tid == real {
            me
        } else {
            s.table.register(tid, Kind::Thread, me).unwrap_or(0)
        };
        t.threads.push(ThreadEntry { vtid, tid });
    }

    let ids = |k, ino| s.table.object_id(k, ino);
    let mut unix_peers = None;
    let open = procfs::list_fds("self");
    for fd in open.iter().copied().filter(|&fd| !is_shim_fd(fd)) {
        let Some((info, mut object)) = procfs::describe_own_fd(fd, &ids) else {
            continue; // closed meanwhile (or the listing's own directory fd)
        };
        let intent = folded.fds.get(&fd);
        match (&mut object, intent.map(|i| &i.opened)) {
            (
                Object::File {
                    path, opened_as, ..
                },
                Some(Opened::File { path: given, .. }),
            ) if given != path => {
                *opened_as = Some(given.clone());
            }
            (Object::Inotify { watches }, Some(Opened::Inotify { watches: given })) => {
                for w in watches {
                    w.path = given.get(&w.wd).map(|(p, _)| p.clone());
                }
            }
            (Object::Socket(sock), _) if sock.domain == libc::AF_UNIX => {
                let peers = unix_peers.get_or_insert_with(migrt::sockdiag::unix_peers);
                sock.peer_ino = peers.get(&sock.ino).copied().filter(|&p| p != 0);
            }
            _ => {}
        }
        t.fds.push(FdEntry {
            fd,
            cloexec: info.flags & libc::O_CLOEXEC != 0,
            flags: info.flags & !libc::O_CLOEXEC,
            journaled: intent.is_some(),
            object,
        });
    }
    for fd in folded.fds.keys().filter(|fd| !open.contains(fd)) {
        t.notes.push(format!(
            "fd {fd} was closed by a call no wrapper saw (inside libc)"
        ));
    }

    let (shm_start, shm_len) = s.table.mapping();
    t.mappings = procfs::file_mappings("self")
        .into_iter()
        .filter(|m| m.start as usize >= shm_start + shm_len || (m.end as usize) <= shm_start)
        .collect();
    (t, view)
}
