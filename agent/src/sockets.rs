//! Rebuilding the session's sockets for a restore (see runtime/src/support.rs for which
//! socket comes back how).
//!
//! - A connection between two processes of the session is made anew with both ends'
//!   addresses: through a temporary listener at the accepting end's address (TCP: the
//!   connecting end bound to its old port first), or as a socket pair when neither end has
//!   a name. Then each end's unread bytes are sent again from the other end, and an end that
//!   had shut down writing shuts down again.
//! - Listeners are bound at their address again (after the connections, which borrowed it)
//!   and listen; connections they had not accepted yet are made again.
//! - Other sockets are bound and connected as they were (unix datagram sockets, UDP).
//!
//! Addresses go through the rebinding policy (`--map-path`, `--map-port`, `--map-addr`).
//! Nothing binds elsewhere than asked: an address in use is an error that says so.

use anyhow::{Context, Result, anyhow, bail};
use migrt::rebind::Rebind;
use migrt::sockaddr::SockAddr;
use migrt::sockstate::SocketState;
use migrt::support::{SocketRole, socket_role};
use migrt::table::{SocketInfo, SocketIntent};
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::HashMap;
use std::os::fd::AsRawFd;

/// One socket of the session, as the images describe it.
pub struct SessionSocket<'a> {
    pub info: &'a SocketInfo,
    pub state: Option<&'a SocketState>,
    pub intent: Option<&'a SocketIntent>,
}

fn os_addr(a: &SockAddr) -> Result<socket2::SockAddr> {
    Ok(match a {
        SockAddr::Path(p) => socket2::SockAddr::unix(std::ffi::OsStr::from_bytes(&p.0))?,
        SockAddr::Abstract(n) => {
            let mut b = vec![0u8];
            b.extend_from_slice(&n.0);
            socket2::SockAddr::unix(std::ffi::OsStr::from_bytes(&b))?
        }
        SockAddr::V4 { ip, port } => std::net::SocketAddr::from((*ip, *port)).into(),
        SockAddr::V6 { ip, port } => std::net::SocketAddr::from((*ip, *port)).into(),
        other => bail!("cannot bind or connect to {other}"),
    })
}

use std::os::unix::ffi::OsStrExt;

fn named(a: &Option<SockAddr>) -> Option<&SockAddr> {
    a.as_ref()
        .filter(|a| !matches!(a, SockAddr::Unnamed | SockAddr::Other { .. }))
}

fn inet(domain: i32) -> bool {
    domain == libc::AF_INET || domain == libc::AF_INET6
}

struct Builder<'a> {
    socks: HashMap<u64, &'a SessionSocket<'a>>,
    rebind: &'a Rebind,
    built: HashMap<u64, Socket>,
}

impl<'a> Builder<'a> {
    /// A fresh socket of the same kind with its saved options (before any bind).
    fn fresh(&self, s: &SessionSocket) -> Result<Socket> {
        let i = s.info;
        let ty = i.ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
        let sock = Socket::new(
            Domain::from(i.domain),
            Type::from(ty),
            Some(Protocol::from(i.protocol)),
        )
        .with_context(|| format!("making socket {}", i.id))?;
        if let Some(st) = s.state {
            for (level, name) in migrt::sockstate::apply_options(sock.as_raw_fd(), st) {
                eprintln!(
                    "mig: restore: socket {}: option {level}/{name} refused by this host",
                    i.id
                );
            }
            // Room for what is put back (a new TCP socket starts with small buffers that
            // grow only as its owner reads): set before connecting, for the window scale.
            let unread: usize = st.unread.iter().map(|m| m.0.len()).sum();
            migrt::sys::ensure_buffer(sock.as_raw_fd(), libc::SO_RCVBUF, unread);
            migrt::sys::ensure_buffer(sock.as_raw_fd(), libc::SO_SNDBUF, st.unsent.0.len());
        }
        Ok(sock)
    }

    fn addr(&self, a: &SockAddr) -> SockAddr {
        self.rebind.addr(a)
    }

    /// Binds `sock` at `a`, saying what is in the way if that fails. For a path, a stale
    /// socket file nobody listens on is removed first.
    fn bind(&self, sock: &Socket, a: &SockAddr, id: u64) -> Result<()> {
        let a = self.addr(a);
        if let SockAddr::Path(p) = &a {
            let path = std::path::Path::new(std::ffi::OsStr::from_bytes(&p.0));
            if listened_on(path) {
                bail!(
                    "socket {id}: {} is in use by a live listener (is the original session still running? stop it, or restore with --map-path)",
                    path.display()
                );
            }
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
        }
        sock.bind(&os_addr(&a)?).map_err(|e| {
            let hint = if inet(sock_domain(&a)) {
                " (is the original session still running? stop it, or restore with --map-port/--map-addr)"
            } else {
                ""
            };
            anyhow!("socket {id}: binding {a} failed: {e}{hint}")
        })
    }

    /// Remakes the connection between sockets `a` and `b` (both in the session).
    fn connection(&mut self, a: &SessionSocket, b: &SessionSocket) -> Result<()> {
        // The accepting end: the one made by accept(), else one with a name of its own.
        let accepted = |s: &SessionSocket| s.intent.is_some_and(|i| i.accepted_from.is_some());
        let (server, client) = if accepted(a) || (!accepted(b) && named(&a.info.local).is_some()) {
            (a, b)
        } else {
            (b, a)
        };
        let (sa, ca) = match named(&server.info.local) {
            Some(addr) if server.info.ty != libc::SOCK_DGRAM => (addr, named(&client.info.local)),
            _ => return self.pair(a, b),
        };
        let listener = self.fresh(server)?;
        listener.set_reuse_address(true)?;
        self.bind(&listener, sa, server.info.id)?;
        listener.listen(16)?;
        let conn = self.fresh(client)?;
        if inet(client.info.domain)
            && let Some(ca) = ca
        {
            // The connecting end's port was the kernel's choice: if something else took
            // it meanwhile, the kernel chooses again (both ends are rebuilt, so they agree).
            conn.set_reuse_address(true)?;
            if let Err(e) = self.bind(&conn, ca, client.info.id)
                && forced_bind(&conn, &os_addr(&self.addr(ca))?).is_err()
            {
                eprintln!("mig: restore: {e:#}; it connects from another port");
            }
        }
        conn.connect(&os_addr(&self.addr(sa))?)
            .with_context(|| format!("reconnecting socket {} to {sa}", client.info.id))?;
        let want = conn.local_addr()?;
        // Whoever else connected to the temporary listener meanwhile is turned away.
        let accepted = loop {
            let (s, from) = listener.accept()?;
            if !inet(client.info.domain) || from.as_socket() == want.as_socket() {
                break s;
            }
        };
        drop(listener);
        if let SockAddr::Path(p) = self.addr(sa) {
            // The name stays the accepted end's; the file goes with the temporary listener
            // (a listener of the session makes its own again).
            let _ = std::fs::remove_file(std::ffi::OsStr::from_bytes(&p.0));
        }
        self.built.insert(server.info.id, accepted);
        self.built.insert(client.info.id, conn);
        Ok(())
    }

    fn pair(&mut self, a: &SessionSocket, b: &SessionSocket) -> Result<()> {
        let ty = a.info.ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
        let (x, y) = Socket::pair(Domain::UNIX, Type::from(ty), None)?;
        for (s, sock) in [(a, &x), (b, &y)] {
            if let Some(st) = s.state {
                migrt::sockstate::apply_options(sock.as_raw_fd(), st);
            }
        }
        self.built.insert(a.info.id, x);
        self.built.insert(b.info.id, y);
        Ok(())
    }

    fn listener(&mut self, s: &SessionSocket) -> Result<()> {
        let sock = self.fresh(s)?;
        let reuse = sock.reuse_address()?;
        // Connections remade a moment ago hold the port: bind beside them, then give the
        // socket its own setting back.
        sock.set_reuse_address(true)?;
        let addr =
            named(&s.info.local).ok_or_else(|| anyhow!("listener {} has no address", s.info.id))?;
        self.bind(&sock, addr, s.info.id)?;
        sock.set_reuse_address(reuse)?;
        let backlog = s.intent.and_then(|i| i.backlog).unwrap_or(libc::SOMAXCONN);
        sock.listen(backlog)?;
        self.built.insert(s.info.id, sock);
        Ok(())
    }

    fn lone(&mut self, s: &SessionSocket) -> Result<()> {
        let sock = self.fresh(s)?;
        let i = s.info;
        if let Some(a) = named(&i.local) {
            let ephemeral = matches!(
                a,
                SockAddr::V4 { port: 0, .. } | SockAddr::V6 { port: 0, .. }
            );
            if !ephemeral {
                self.bind(&sock, a, i.id)?;
            }
        }
        if let Some(p) = named(&i.peer) {
            // Datagram sockets connect to a name, whoever holds it now.
            if let Err(e) = sock.connect(&os_addr(&self.addr(p))?) {
                eprintln!(
                    "mig: restore: socket {}: reconnecting to {p} failed ({e}); left unconnected",
                    i.id
                );
            }
        }
        self.built.insert(i.id, sock);
        Ok(())
    }

    /// A connection to a peer outside the session, handed over whole: made again in TCP
    /// repair mode from its old address (which moved here with the session).
    fn handed(&mut self, s: &SessionSocket, r: &migrt::tcprepair::TcpRepair) -> Result<()> {
        let i = s.info;
        let (Some(local), Some(peer)) = (named(&i.local), named(&i.peer)) else {
            bail!(
                "socket {}: a handed-over connection without addresses",
                i.id
            );
        };
        let sock = self.fresh(s)?;
        migrt::sys::ensure_buffer(sock.as_raw_fd(), libc::SO_RCVBUF, r.recv_queue.0.len());
        migrt::sys::ensure_buffer(sock.as_raw_fd(), libc::SO_SNDBUF, r.send_queue.0.len());
        migrt::tcprepair::rebuild(
            &sock,
            r,
            &os_addr(&self.addr(local))?,
            &os_addr(&self.addr(peer))?,
        )
        .with_context(|| format!("socket {}: the connection {local} -> {peer}", i.id))?;
        self.built.insert(i.id, sock);
        Ok(())
    }

    fn pending(&mut self, s: &SessionSocket, listener: u64) -> Result<()> {
        let sock = self.fresh(s)?;
        let l = self
            .built
            .get(&listener)
            .ok_or_else(|| anyhow!("listener {listener} missing"))?;
        let to = l.local_addr()?;
        if inet(s.info.domain)
            && let Some(a) = named(&s.info.local)
        {
            sock.set_reuse_address(true)?;
            self.bind(&sock, a, s.info.id)?;
        }
        sock.connect(&to)
            .with_context(|| format!("reconnecting socket {} to its listener", s.info.id))?;
        self.built.insert(s.info.id, sock);
        Ok(())
    }
}

/// A connecting end's old port may share its bucket with an unrelated TIME_WAIT socket
/// (the kernel's own choice of port allows that, an explicit bind does not). In TCP repair
/// mode a bind ignores such conflicts; repair mode needs CAP_NET_ADMIN and is left again
/// before the connect.
fn forced_bind(sock: &Socket, addr: &socket2::SockAddr) -> std::io::Result<()> {
    let fd = sock.as_raw_fd();
    migrt::sys::set_sockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 1)?;
    let bound = sock.bind(addr);
    migrt::sys::set_sockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 0)?;
    bound
}

/// Sends one message (or stream piece) whole; an empty one as an empty datagram.
fn send_all(sock: &Socket, data: &[u8], id: u64) -> Result<()> {
    // A peer that cannot take it all makes the restore fail, not hang.
    sock.set_write_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut at = 0;
    loop {
        let n = sock
            .send(&data[at..])
            .with_context(|| format!("putting back the bytes of socket {id}"))?;
        at += n;
        if at >= data.len() {
            sock.set_write_timeout(None)?;
            return Ok(());
        }
    }
}

/// Whether a live listener has unix socket `path` (a connect that is not refused: without
/// waiting, since a frozen listener with a full backlog would keep a blocking one waiting).
fn listened_on(path: &std::path::Path) -> bool {
    let Ok(s) = Socket::new(Domain::UNIX, Type::STREAM, None) else {
        return false;
    };
    let _ = s.set_nonblocking(true);
    let Ok(addr) = socket2::SockAddr::unix(path) else {
        return false;
    };
    match s.connect(&addr) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() == Some(libc::EAGAIN),
    }
}

fn sock_domain(a: &SockAddr) -> i32 {
    match a {
        SockAddr::V4 { .. } => libc::AF_INET,
        SockAddr::V6 { .. } => libc::AF_INET6,
        _ => libc::AF_UNIX,
    }
}

/// Builds every socket; returns them by session-wide id.
pub fn build(socks: &[SessionSocket], rebind: &Rebind) -> Result<HashMap<u64, Socket>> {
    let mut b = Builder {
        socks: socks.iter().map(|s| (s.info.id, s)).collect(),
        rebind,
        built: HashMap::new(),
    };
    let listeners: Vec<&SocketInfo> = socks
        .iter()
        .map(|s| s.info)
        .filter(|i| i.listening)
        .collect();
    let roles: Vec<(u64, SocketRole)> = socks
        .iter()
        .map(|s| (s.info.id, socket_role(s.info, &listeners)))
        .collect();
    // Connections first (they borrow their listener's address), listeners, then the rest.
    for (id, role) in &roles {
        if let SocketRole::Connected(peer) = role
            && !b.built.contains_key(id)
        {
            let (x, y) = (b.socks[id], b.socks.get(peer).copied());
            match y {
                Some(y) => b.connection(x, y)?,
                None => b.lone(x)?,
            }
        }
    }
    for (id, role) in &roles {
        if *role == SocketRole::Listener {
            b.listener(b.socks[id])?;
        }
    }
    for (id, role) in &roles {
        let s = b.socks[id];
        match role {
            SocketRole::Pending(l) => b.pending(s, *l)?,
            SocketRole::Lone => b.lone(s)?,
            SocketRole::External(_) => {
                if let Some(r) = s.state.and_then(|st| st.handover.as_ref()) {
                    b.handed(s, r)?
                }
            }
            _ => {}
        }
    }
    refill(&b)?;
    Ok(b.built)
}

/// Sends every end's unread bytes again from its peer, then what each end had sent that
/// its peer had not taken yet, then shuts down what was shut down.
fn refill(b: &Builder) -> Result<()> {
    for s in b.socks.values() {
        let Some(st) = s.state.filter(|st| !st.unread.is_empty()) else {
            continue;
        };
        let sender = s.info.peer_link.as_ref().and_then(|p| b.built.get(&p.id));
        let Some(sender) = sender else {
            let n: usize = st.unread.iter().map(|m| m.0.len()).sum();
            eprintln!(
                "mig: restore: socket {}: {n} unread byte(s) from a peer outside the session are not put back",
                s.info.id
            );
            continue;
        };
        for m in &st.unread {
            send_all(sender, &m.0, s.info.id)?;
        }
    }
    for s in b.socks.values() {
        let Some(st) = s.state else { continue };
        if st.unsent_lost > 0 {
            eprintln!(
                "mig: restore: socket {}: {} byte(s) it had sent were not acknowledged yet and could not be read (needs root): lost",
                s.info.id, st.unsent_lost
            );
        }
        let peer = s.info.peer_link.as_ref().and_then(|p| b.socks.get(&p.id));
        let unsent = st.after_peer(peer.and_then(|p| p.state));
        if let Some(sock) = b.built.get(&s.info.id).filter(|_| !unsent.is_empty()) {
            send_all(sock, unsent, s.info.id)?;
        }
    }
    for s in b.socks.values() {
        let how = s.intent.and_then(|i| i.shutdown);
        if let (Some(how), Some(sock)) = (how, b.built.get(&s.info.id)) {
            let how = match how {
                libc::SHUT_RD => std::net::Shutdown::Read,
                libc::SHUT_WR => std::net::Shutdown::Write,
                _ => std::net::Shutdown::Both,
            };
            let _ = sock.shutdown(how);
        }
    }
    Ok(())
}
