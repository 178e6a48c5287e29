//! Service addresses that move with a session (`mig migrate --move-addr ADDR`): taken off
//! the source host once the session is frozen — which also stops any packet to or from
//! its connections there, so nothing changes after they are read — and put on the target's
//! interface on the same subnet before the session is restored, then announced by a
//! gratuitous ARP so that the neighbours send to the target from then on.
//!
//! Addresses are read with iproute2's `ip`, and changed through rtnetlink (root); IPv4
//! only.

use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;

/// An address as one interface holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub dev: String,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} on {}", self.ip, self.prefix, self.dev)
    }
}

fn ip(args: &[&str]) -> Result<String> {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Every IPv4 address of this host (`ip -o -4 addr show`).
fn addresses() -> Result<Vec<Held>> {
    let out = ip(&["-o", "-4", "addr", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            // "2: eth0    inet 10.0.0.2/24 brd 10.0.0.255 scope global eth0 ..."
            let mut w = l.split_whitespace();
            let dev = w.nth(1)?.split('@').next()?.to_string();
            let (ip, prefix) = w.nth(1)?.split_once('/')?;
            Some(Held {
                ip: ip.parse().ok()?,
                prefix: prefix.parse().ok()?,
                dev,
            })
        })
        .collect())
}

/// The interface holding `ip` here, if one does.
pub fn find(ip: Ipv4Addr) -> Result<Option<Held>> {
    Ok(addresses()?.into_iter().find(|h| h.ip == ip))
}

fn subnet(ip: Ipv4Addr, prefix: u8) -> u32 {
    let mask = u32::MAX
        .checked_shl(32 - prefix.min(32) as u32)
        .unwrap_or(0);
    u32::from(ip) & mask
}

/// Where `ip/prefix` would go on this host: the interface with another address on that
/// subnet.
pub fn home_for(ip: Ipv4Addr, prefix: u8) -> Result<Held> {
    let home = addresses()?
        .into_iter()
        .find(|h| h.prefix == prefix && subnet(h.ip, prefix) == subnet(ip, prefix));
    match home {
        Some(h) if h.ip == ip => bail!("{ip} is on this host already ({})", h.dev),
        Some(h) => Ok(Held {
            ip,
            prefix,
            dev: h.dev,
        }),
        None => bail!(
            "no interface of this host is on {}/{prefix}, where {ip} belongs",
            Ipv4Addr::from(subnet(ip, prefix))
        ),
    }
}

/// Address changes made on this host, undone (in reverse) when dropped unless kept.
#[derive(Default)]
pub struct Changes {
    /// (the address, whether it was added here — else removed)
    undo: Vec<(Held, bool)>,
}

/// What `ip addr add|del ADDR/PREFIX dev DEV` does, said to the kernel directly (rtnetlink
/// RTM_NEWADDR / RTM_DELADDR): running `ip` took 1.5-3 ms inside the freeze.
fn set(h: &Held, add: bool) -> Result<()> {
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    let dev = std::ffi::CString::new(h.dev.as_bytes())?;
    // SAFETY: dev is a valid C string.
    let index = unsafe { libc::if_nametoindex(dev.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("interface {}", h.dev));
    }
    // struct ifaddrmsg { family, prefixlen, flags, scope: u8; index: u32 }, then the
    // attributes: the address as this end's (local) and as the peer's (address).
    let mut req = vec![libc::AF_INET as u8, h.prefix, 0, 0];
    req.extend_from_slice(&index.to_ne_bytes());
    for kind in [IFA_LOCAL, IFA_ADDRESS] {
        req.extend_from_slice(&8u16.to_ne_bytes());
        req.extend_from_slice(&kind.to_ne_bytes());
        req.extend_from_slice(&h.ip.octets());
    }
    let (msg, flags) = match add {
        true => (
            libc::RTM_NEWADDR,
            libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL,
        ),
        false => (libc::RTM_DELADDR, libc::NLM_F_ACK),
    };
    migrt::sys::netlink_call(libc::NETLINK_ROUTE, msg, flags, &req)
        .with_context(|| format!("{} {h}", if add { "adding" } else { "removing" }))?;
    Ok(())
}

impl Changes {
    pub fn remove(&mut self, h: &Held) -> Result<()> {
        set(h, false)?;
        self.undo.push((h.clone(), false));
        Ok(())
    }

    pub fn add(&mut self, h: &Held) -> Result<()> {
        set(h, true)?;
        self.undo.push((h.clone(), true));
        Ok(())
    }

    /// The addresses added here, in order.
    pub fn added(&self) -> impl Iterator<Item = &Held> {
        self.undo.iter().filter(|(_, added)| *added).map(|(h, _)| h)
    }

    pub fn keep(mut self) {
        self.undo.clear();
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        for (h, added) in self.undo.drain(..).rev() {
            if let Err(e) = set(&h, !added) {
                eprintln!("mig: putting address {h} back failed: {e:#}");
            }
            // Back here: the neighbours may have learnt meanwhile that it was elsewhere (a
            // lazy migration's target announced it, then its post-copy broke off).
            if !added && let Err(e) = announce(&h) {
                eprintln!("mig: announcing address {h} again failed: {e:#}");
            }
        }
    }
}

/// Tells the neighbours on `h.dev` that `h.ip` is here now: a gratuitous ARP request
/// (sender and target both the address) to the broadcast address.
pub fn announce(h: &Held) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const ETH_P_ARP: u16 = 0x0806;
    const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
    let name = h.dev.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        bail!("bad interface name {}", h.dev);
    }
    // SAFETY: plain socket call; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, ETH_P_ARP.to_be() as i32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("an ARP socket (needs root)");
    }
    // SAFETY: fd was just made and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name, then (for SIOCGIFHWADDR) a sockaddr whose data is the MAC.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name);
    // SAFETY: the ioctl reads and writes one struct ifreq (40 bytes).
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFHWADDR, ifreq.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("the hardware address of {}", h.dev));
    }
    let mac = &ifreq[18..24];
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    arp.extend_from_slice(mac);
    arp.extend_from_slice(&h.ip.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&h.ip.octets());
    let cname = std::ffi::CString::new(name)?;
    // SAFETY: zeroed sockaddr_ll is valid; cname is a valid C string.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].fill(0xff);
    // SAFETY: arp and `to` are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            arp.as_ptr().cast(),
            arp.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("announcing {h}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let a: Ipv4Addr = "10.77.0.100".parse().unwrap();
        assert_eq!(subnet(a, 24), u32::from(Ipv4Addr::new(10, 77, 0, 0)));
        assert_eq!(subnet(a, 32), u32::from(a));
        assert_eq!(subnet(a, 0), 0);
    }
}
