//! The link between `mig` and a host's agent: postcard frames over TCP, opened by a mutual
//! challenge-response on a shared key (HMAC-SHA256: each side proves it holds the key
//! without sending it), then a running MAC over every frame the client sends (keyed
//! BLAKE3, with a key derived from the shared key and both challenges: several times
//! faster than HMAC-SHA256 over gigabytes of image), checked by the agent before it uses
//! any of it. (The agent's own frames are not in it: they are questions — what the client
//! answers names what it answers, and is checked against the question.) Not a cipher: the stream is authenticated, not secret (put it in a tunnel
//! where secrecy matters).

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_PORT: u16 = 7070;
const VERSION: u32 = 8;
/// No frame is larger (a chunk of image is 1 MiB).
pub const MAX_FRAME: usize = 4 << 20;
pub const CHUNK: usize = 1 << 20;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Serialize, Deserialize)]
pub enum Msg {
    /// agent → client, first: its challenge.
    Hello {
        version: u32,
        nonce: [u8; 32],
    },
    /// client → agent: its own challenge and the answer to the agent's.
    Auth {
        nonce: [u8; 32],
        mac: [u8; 32],
    },
    /// agent → client: the answer to the client's challenge.
    Welcome {
        mac: [u8; 32],
    },
    /// What sessions of user `uid` (the asker) run on the agent's host (`mig ps --host
    /// [--json]`): as `mig ps` prints them there.
    Ps {
        json: bool,
        uid: u32,
    },
    Sessions(String),
    /// A session would come: its name, owner, the rebinding rules for the restore
    /// (`--map-...` arguments), the addresses that move with it (`ADDR/PREFIX`) and
    /// whether it comes lazily (its memory fetched from the sender after it runs), and its
    /// resident size (bytes: where the agent keeps its image, spool.rs).
    /// Answered by Ready or Refused before anything is frozen.
    Incoming {
        name: String,
        uid: u32,
        restore_args: Vec<String>,
        moving: Vec<String>,
        lazy: bool,
        resident: u64,
    },
    Ready,
    /// The session's image files, in the order their chunks refer to them.
    Files(Vec<String>),
    /// A piece of file `file` (index into `files`); an empty piece ends the file.
    Chunk {
        file: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// client → agent, after the pre-copy rounds: answered by Synced once everything sent
    /// before is stored there (the freeze does not wait for the agent's backlog).
    Sync,
    Synced,
    /// End of the stream: the MAC over every frame the client sent since Welcome.
    Sent {
        mac: [u8; 32],
    },
    /// agent → client: the session runs on the agent's host.
    Running {
        name: String,
    },
    /// agent → client: refused, and why.
    Refused(String),
    /// agent → client, in a lazy migration: send `len` bytes of process `vpid`'s memory at
    /// `addr`, as it was frozen (answered by Pages, then Sent). `ahead`: asked before the
    /// target needs it (a guess: answered with no bytes if there are none there).
    Want {
        vpid: i32,
        addr: u64,
        len: u64,
        ahead: bool,
    },
    /// The answer to Want: which of the pages have data, and those pages (sparse.rs).
    Pages {
        vpid: i32,
        addr: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// agent → client, in a lazy migration: nothing wanted for a while, the session still
    /// runs here (the sender keeps waiting).
    Waiting,
    /// agent → client: the session has all its memory here; the sender's part is over.
    Complete,
    /// client → agent: `len` bytes of file `from` at `offset`, come already, are the next
    /// piece of file `file` too (pages sent once: samepages.rs).
    Same {
        file: u32,
        from: u32,
        offset: u64,
        len: u64,
    },
}

fn mac_of(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn nonce() -> Result<[u8; 32]> {
    use std::io::Read;
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// The key file: `--key`, else $MIGSHIM_KEY, else ~/.config/migshim/agent.key.
pub fn key_path(given: Option<&Path>) -> PathBuf {
    if let Some(p) = given {
        return p.into();
    }
    if let Some(p) = std::env::var_os("MIGSHIM_KEY") {
        return p.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    Path::new(&home).join(".config/migshim/agent.key")
}

pub fn read_key(path: &Path) -> Result<Vec<u8>> {
    let key = std::fs::read(path).with_context(|| {
        format!(
            "reading the agent key {} (the same file on both hosts; `mig agent` makes one if it has none)",
            path.display()
        )
    })?;
    if key.len() < 16 {
        bail!("{}: a key needs at least 16 bytes", path.display());
    }
    Ok(key)
}

/// Reads the key, or makes a new random one (mode 0600) when there is none.
pub fn read_or_make_key(path: &Path) -> Result<Vec<u8>> {
    if !path.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let key: String = nonce()?.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, key.as_bytes()))
            .with_context(|| format!("creating the key {}", path.display()))?;
        eprintln!(
            "mig agent: made a new key {} — copy it to the hosts that migrate sessions here",
            path.display()
        );
    }
    read_key(path)
}

/// One end of an authenticated link.
pub struct Link {
    pub stream: TcpStream,
    /// The running MAC over the client's frames (both ends keep it).
    stream_mac: blake3::Hasher,
    /// Whether this is the client's end.
    client: bool,
}

impl Link {
    pub fn send(&mut self, m: &Msg) -> Result<()> {
        let body = postcard::to_stdvec(m)?;
        if self.client {
            self.stream_mac.update(&body);
        }
        migrt::wire::write_frame_body(&mut self.stream, &body)?;
        Ok(())
    }

    /// Sends `empty` — a message whose last field is bytes, left empty — with `data` as
    /// those bytes, as `send` would, without copying `data` into a frame first.
    pub fn send_with_data(&mut self, empty: &Msg, data: &[u8]) -> Result<()> {
        // Its encoding ends in the bytes' length (a varint, 0 here) and the bytes.
        let mut head = postcard::to_stdvec(empty)?;
        if head.pop() != Some(0) {
            bail!("{empty:?} does not end in empty bytes");
        }
        let mut n = data.len();
        while n >= 0x80 {
            head.push(n as u8 | 0x80);
            n >>= 7;
        }
        head.push(n as u8);
        if self.client {
            self.stream_mac.update(&head);
            self.stream_mac.update(data);
        }
        let len = ((head.len() + data.len()) as u32).to_le_bytes();
        use std::io::Write;
        self.stream.write_all(&[&len[..], &head].concat())?;
        self.stream.write_all(data)?;
        Ok(())
    }

    /// Sends the MAC of everything sent so far (ends the client's stream).
    pub fn send_mac(&mut self) -> Result<()> {
        let mac = *self.stream_mac.finalize().as_bytes();
        migrt::wire::write_frame(&mut self.stream, &Msg::Sent { mac })?;
        Ok(())
    }

    pub fn recv(&mut self) -> Result<Msg> {
        let (m, body) = migrt::wire::read_frame_upto::<Msg>(&mut self.stream, MAX_FRAME)?;
        if !self.client && !matches!(m, Msg::Sent { .. }) {
            self.stream_mac.update(&body);
        }
        Ok(m)
    }

    /// The agent's end: receives a frame into `body` (reused); if it is `empty` — a
    /// message whose last field is bytes — with bytes, where they are in `body` (not copied
    /// out), else the message.
    pub fn recv_with_data(
        &mut self,
        body: &mut Vec<u8>,
        empty: &Msg,
    ) -> Result<std::result::Result<std::ops::Range<usize>, Msg>> {
        self.read_body(body)?;
        let head = postcard::to_stdvec(empty)?;
        let data = body
            .strip_prefix(&head[..head.len() - 1])
            .and_then(|rest| postcard::take_from_bytes::<usize>(rest).ok())
            .filter(|(n, data)| *n == data.len());
        match data {
            Some((n, _)) => {
                self.stream_mac.update(body);
                Ok(Ok(body.len() - n..body.len()))
            }
            None => self.decode(body).map(Err),
        }
    }

    /// The agent's end: receives a frame into `body` (reused); if it is a Chunk (of any
    /// file), the file and where its bytes are in `body` (not copied out), else the
    /// message. (Several processes' images come interleaved: a chunk of another file than
    /// the last one's is as common as one of the same.)
    pub fn recv_chunk(
        &mut self,
        body: &mut Vec<u8>,
    ) -> Result<std::result::Result<(u32, std::ops::Range<usize>), Msg>> {
        self.read_body(body)?;
        // A Chunk's encoding: its variant, the file (varint), the bytes' length (varint), the
        // bytes. (Of file 0 with no bytes, the last two are a 0 each.)
        let head = postcard::to_stdvec(&Msg::Chunk {
            file: 0,
            data: Vec::new(),
        })?;
        let chunk = body
            .strip_prefix(&head[..head.len() - 2])
            .and_then(|rest| postcard::take_from_bytes::<u32>(rest).ok())
            .and_then(|(file, rest)| Some((file, postcard::take_from_bytes::<usize>(rest).ok()?)))
            .filter(|(_, (n, data))| *n == data.len());
        match chunk {
            Some((file, (n, _))) => {
                self.stream_mac.update(body);
                Ok(Ok((file, body.len() - n..body.len())))
            }
            None => self.decode(body).map(Err),
        }
    }

    /// Reads a frame into `body`.
    fn read_body(&mut self, body: &mut Vec<u8>) -> Result<()> {
        use std::io::Read;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            bail!("a frame of {len} bytes is over the limit");
        }
        body.resize(len, 0);
        self.stream.read_exact(body)?;
        Ok(())
    }

    /// A frame received (the agent's end) decoded whole, and counted in the MAC.
    fn decode(&mut self, body: &[u8]) -> Result<Msg> {
        let m: Msg = postcard::from_bytes(body)?;
        if !matches!(m, Msg::Sent { .. }) {
            self.stream_mac.update(body);
        }
        Ok(m)
    }

    /// Whether `mac` is the MAC of everything received so far.
    pub fn verify(&self, mac: &[u8; 32]) -> bool {
        // (blake3::Hash compares in constant time)
        self.stream_mac.finalize() == blake3::Hash::from_bytes(*mac)
    }
}

fn stream_mac(key: &[u8], a: &[u8; 32], c: &[u8; 32]) -> blake3::Hasher {
    blake3::Hasher::new_keyed(&mac_of(key, &[b"mig-stream\0", a, c]))
}

/// The client side: connects to an agent at `to` (HOST or HOST:PORT) and authenticates.
pub fn connect(to: &str, key: &[u8], timeout: Duration) -> Result<Link> {
    let addr = if to.contains(':') && !to.ends_with(']') {
        to.to_string()
    } else {
        format!("{to}:{DEFAULT_PORT}")
    };
    let sa = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&sa, timeout).with_context(|| {
        format!("connecting to the agent at {addr} (is `mig agent` running there?)")
    })?;
    // A peer or link that goes silent fails the call within `timeout`, both ways.
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let agent_nonce = match migrt::wire::read_frame_upto::<Msg>(&mut stream, MAX_FRAME)?.0 {
        Msg::Hello { version, nonce } if version == VERSION => nonce,
        Msg::Hello { version, .. } => {
            bail!("the agent at {addr} speaks protocol {version}, this mig {VERSION}")
        }
        Msg::Refused(why) => bail!("the agent at {addr} refused: {why}"),
        other => bail!("the agent at {addr} said {other:?}"),
    };
    let mine = nonce()?;
    let mac = mac_of(key, &[b"mig-client\0", &agent_nonce, &mine]);
    migrt::wire::write_frame(&mut stream, &Msg::Auth { nonce: mine, mac })?;
    match migrt::wire::read_frame_upto::<Msg>(&mut stream, MAX_FRAME)
        .with_context(|| format!("the agent at {addr} closed the link: wrong key?"))?
        .0
    {
        Msg::Welcome { mac } if mac == mac_of(key, &[b"mig-agent\0", &mine, &agent_nonce]) => {}
        Msg::Welcome { .. } => {
            bail!("the agent at {addr} does not hold our key: not talking to it")
        }
        Msg::Refused(why) => bail!("the agent at {addr} refused: {why}"),
        other => bail!("the agent at {addr} said {other:?}"),
    }
    Ok(Link {
        stream_mac: stream_mac(key, &agent_nonce, &mine),
        stream,
        client: true,
    })
}

/// The agent side: challenges a new peer; Ok only if it answered with the key.
pub fn accept(mut stream: TcpStream, key: &[u8]) -> Result<Link> {
    let mine = nonce()?;
    migrt::wire::write_frame(
        &mut stream,
        &Msg::Hello {
            version: VERSION,
            nonce: mine,
        },
    )?;
    let (theirs, mac) = match migrt::wire::read_frame_upto::<Msg>(&mut stream, 256)?.0 {
        Msg::Auth { nonce, mac } => (nonce, mac),
        other => bail!("expected an answer to the challenge, got {other:?}"),
    };
    if mac != mac_of(key, &[b"mig-client\0", &mine, &theirs]) {
        let _ = migrt::wire::write_frame(
            &mut stream,
            &Msg::Refused("authentication failed: not our key".into()),
        );
        bail!("authentication failed: the peer does not hold our key");
    }
    let mac = mac_of(key, &[b"mig-agent\0", &theirs, &mine]);
    migrt::wire::write_frame(&mut stream, &Msg::Welcome { mac })?;
    Ok(Link {
        stream_mac: stream_mac(key, &mine, &theirs),
        stream,
        client: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_authenticate_and_the_stream_is_checked() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let key = b"0123456789abcdef0123".to_vec();
        let k2 = key.clone();
        let agent = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut link = accept(s, &k2).unwrap();
            let m = link.recv().unwrap();
            assert!(matches!(
                m,
                Msg::Ps {
                    json: false,
                    uid: 7
                }
            ));
            // (Pages are sent without a copy, and read as any frame.)
            let mut body = Vec::new();
            let pages = Msg::Pages {
                vpid: 4200001,
                addr: 0x7f00_0000_0000,
                data: Vec::new(),
            };
            let at = link.recv_with_data(&mut body, &pages).unwrap().unwrap();
            assert_eq!(body[at], [7u8; 300]);
            // (Chunks of any file are found in place too.)
            let (file, at) = link.recv_chunk(&mut body).unwrap().unwrap();
            assert_eq!((file, &body[at]), (300, &[8u8; 200][..]));
            // (Not the message expected: decoded whole.)
            let m = link.recv_chunk(&mut body).unwrap();
            assert!(matches!(m, Err(Msg::Pages { vpid: 4200001, data, .. }) if data == [9u8; 10]));
            let Msg::Sent { mac } = link.recv().unwrap() else {
                panic!()
            };
            assert!(link.verify(&mac));
            // A wrong key is turned away.
            let (s, _) = l.accept().unwrap();
            assert!(accept(s, &k2).is_err());
        });
        let mut link = connect(&format!("127.0.0.1:{port}"), &key, Duration::from_secs(5)).unwrap();
        link.send(&Msg::Ps {
            json: false,
            uid: 7,
        })
        .unwrap();
        let pages = Msg::Pages {
            vpid: 4200001,
            addr: 0x7f00_0000_0000,
            data: Vec::new(),
        };
        link.send_with_data(&pages, &[7u8; 300]).unwrap();
        link.send_with_data(
            &Msg::Chunk {
                file: 300,
                data: Vec::new(),
            },
            &[8u8; 200],
        )
        .unwrap();
        link.send_with_data(&pages, &[9u8; 10]).unwrap();
        link.send_mac().unwrap();
        let e = connect(
            &format!("127.0.0.1:{port}"),
            b"another key, 16+ bytes",
            Duration::from_secs(5),
        );
        assert!(e.is_err());
        agent.join().unwrap();
    }
}
