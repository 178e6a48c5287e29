//! Rebinding policy: how a restored session's paths, ports and addresses map onto the new
//! host (`--map-path OLD=NEW`, `--map-port OLD=NEW`, `--map-addr OLD=NEW`). The default,
//! with no rule, reproduces every old binding.

use crate::record::Bytes;
use crate::sockaddr::SockAddr;
use std::net::IpAddr;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rebind {
    /// Path prefixes, the longest matching one applies.
    paths: Vec<(Vec<u8>, Vec<u8>)>,
    ports: Vec<(u16, u16)>,
    addrs: Vec<(IpAddr, IpAddr)>,
}

fn split(rule: &str) -> Result<(&str, &str), String> {
    rule.split_once('=')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| format!("{rule:?}: expected OLD=NEW"))
}

/// OLD=NEW parsed as two values of one kind (`what` names it in the error).
fn pair<T: std::str::FromStr>(rule: &str, what: &str) -> Result<(T, T), String> {
    let (old, new) = split(rule)?;
    let parse = |s: &str| {
        s.parse::<T>()
            .map_err(|_| format!("{rule:?}: {s:?} is not {what}"))
    };
    Ok((parse(old)?, parse(new)?))
}

impl Rebind {
    pub fn add_path(&mut self, rule: &str) -> Result<(), String> {
        let (old, new) = split(rule)?;
        let trim = |s: &str| s.trim_end_matches('/').as_bytes().to_vec();
        self.paths.push((trim(old), trim(new)));
        self.paths
            .sort_by_key(|(old, _)| std::cmp::Reverse(old.len()));
        Ok(())
    }

    pub fn add_port(&mut self, rule: &str) -> Result<(), String> {
        self.ports.push(pair(rule, "a port")?);
        Ok(())
    }

    pub fn add_addr(&mut self, rule: &str) -> Result<(), String> {
        self.addrs.push(pair(rule, "an IP address")?);
        Ok(())
    }

    /// A path on the new host (a rule's prefix matches whole path components only).
    pub fn path(&self, p: &[u8]) -> Bytes {
        for (old, new) in &self.paths {
            if let Some(rest) = p.strip_prefix(old.as_slice())
                && (rest.is_empty() || rest[0] == b'/')
            {
                let mut out = new.clone();
                out.extend_from_slice(rest);
                return Bytes(out);
            }
        }
        Bytes(p.to_vec())
    }

    /// A socket address on the new host.
    pub fn addr(&self, a: &SockAddr) -> SockAddr {
        let port = |p: u16| self.ports.iter().find(|r| r.0 == p).map_or(p, |r| r.1);
        let ip = |i: IpAddr| self.addrs.iter().find(|r| r.0 == i).map_or(i, |r| r.1);
        match a {
            SockAddr::Path(p) => SockAddr::Path(self.path(&p.0)),
            SockAddr::V4 { ip: v, port: p } => match ip(IpAddr::from(*v)) {
                IpAddr::V4(n) => SockAddr::V4 {
                    ip: n.octets(),
                    port: port(*p),
                },
                IpAddr::V6(n) => SockAddr::V6 {
                    ip: n.octets(),
                    port: port(*p),
                },
            },
            SockAddr::V6 { ip: v, port: p } => match ip(IpAddr::from(*v)) {
                IpAddr::V4(n) => SockAddr::V4 {
                    ip: n.octets(),
                    port: port(*p),
                },
                IpAddr::V6(n) => SockAddr::V6 {
                    ip: n.octets(),
                    port: port(*p),
                },
            },
            other => other.clone(),
        }
    }
}

/// The rules as `mig restore` arguments (empty: none).
impl std::fmt::Display for Rebind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rules: Vec<String> = Vec::new();
        for (old, new) in &self.paths {
            rules.push(format!(
                "--map-path {}={}",
                String::from_utf8_lossy(old),
                String::from_utf8_lossy(new)
            ));
        }
        rules.extend(
            self.ports
                .iter()
                .map(|(o, n)| format!("--map-port {o}={n}")),
        );
        rules.extend(
            self.addrs
                .iter()
                .map(|(o, n)| format!("--map-addr {o}={n}")),
        );
        write!(f, "{}", rules.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_paths_ports_and_addresses() {
        let mut r = Rebind::default();
        r.add_path("/srv/a=/srv/b/").unwrap();
        r.add_path("/srv/a/deep=/x").unwrap();
        r.add_port("8000=9000").unwrap();
        r.add_addr("127.0.0.1=127.0.0.2").unwrap();
        assert_eq!(r.path(b"/srv/a/f.txt").0, b"/srv/b/f.txt");
        assert_eq!(r.path(b"/srv/a/deep/f").0, b"/x/f");
        assert_eq!(r.path(b"/srv/ab").0, b"/srv/ab", "only whole components");
        assert_eq!(r.path(b"/srv/a").0, b"/srv/b");
        let a = r.addr(&SockAddr::V4 {
            ip: [127, 0, 0, 1],
            port: 8000,
        });
        assert_eq!(
            a,
            SockAddr::V4 {
                ip: [127, 0, 0, 2],
                port: 9000
            }
        );
        assert!(r.add_port("x=1").is_err());
        assert!(r.add_path("nothing").is_err());
        assert_eq!(Rebind::default().to_string(), "");
        assert_eq!(r.to_string().matches("--map-").count(), 4);
    }
}
