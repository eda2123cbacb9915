//! User-space side of the ABI: `aya::Pod` impls and conversions to `std::net`.
#![expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait for plain-old-data map types")]

extern crate std;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    DirectEvent, DirectFlow, DirectPair, DirectPairKey, DirectPending, FlowKey, IpKey, MeshConfig, NetnsPod,
    NetnsPortKey, OrigDst, PodInfo, SockAddrKey, SpliceEnd, SpliceLimit,
};

// SAFETY: each type is #[repr(C)], Copy, made only of integers, with explicit padding
// fields, so every bit pattern is valid and there are no uninitialised bytes.
unsafe impl aya::Pod for IpKey {}
// SAFETY: as above.
unsafe impl aya::Pod for PodInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for OrigDst {}
// SAFETY: as above.
unsafe impl aya::Pod for SockAddrKey {}
// SAFETY: as above.
unsafe impl aya::Pod for NetnsPod {}
// SAFETY: as above.
unsafe impl aya::Pod for MeshConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for NetnsPortKey {}
// SAFETY: as above (two IpKeys and two u32s: no padding at all).
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above (three u64s and two u32s: no padding).
unsafe impl aya::Pod for SpliceEnd {}
// SAFETY: as above (two u64s).
unsafe impl aya::Pod for SpliceLimit {}
// SAFETY: as above (two IpKeys and two u32s).
unsafe impl aya::Pod for DirectPairKey {}
// SAFETY: as above (one u64).
unsafe impl aya::Pod for DirectPair {}
// SAFETY: as above (an IpKey and a u64: 24 bytes, 8-aligned, no padding).
unsafe impl aya::Pod for DirectPending {}
// SAFETY: as above (a u64 and two u32s).
unsafe impl aya::Pod for DirectFlow {}
// SAFETY: as above (a FlowKey, two u32s and two u64s: no padding).
unsafe impl aya::Pod for DirectEvent {}

impl IpKey {
    /// The key for `ip`; IPv4 (and IPv4-mapped IPv6) become `::ffff:a.b.c.d`.
    pub fn from_ip(ip: IpAddr) -> Self {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let o = v6.octets();
        let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        Self { words: [word(0), word(4), word(8), word(12)] }
    }

    /// The address; IPv4-mapped keys come back as IPv4.
    pub fn to_ip(self) -> IpAddr {
        let mut o = [0u8; 16];
        for (i, w) in self.words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(o);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

/// The network-order word of an IPv4 address, as `bpf_sock_addr.user_ip4` holds it.
pub fn ip4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl SockAddrKey {
    /// The key for a client socket address as seen on `accept()`.
    pub fn from_socket_addr(addr: SocketAddr) -> Self {
        Self { ip: IpKey::from_ip(addr.ip()), port: u32::from(addr.port()) }
    }
}

impl OrigDst {
    /// The destination as a socket address (IPv4 for IPv4-mapped).
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.to_ip(), self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_key_matches_kernel_mapped_layout() {
        let ip = Ipv4Addr::new(10, 10, 1, 2);
        let key = IpKey::from_ip(IpAddr::V4(ip));
        assert_eq!(key, IpKey::from_v4(ip4_word(ip)));
        assert!(key.is_v4_mapped());
        assert_eq!(key.to_ip(), IpAddr::V4(ip));
    }

    #[test]
    fn ipv6_key_round_trips() {
        let ip: IpAddr = "fd00::1:2".parse().unwrap();
        let key = IpKey::from_ip(ip);
        assert!(!key.is_v4_mapped());
        assert_eq!(key.to_ip(), ip);
    }

    #[test]
    fn mapped_ipv6_input_is_keyed_as_ipv4() {
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let plain: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(IpKey::from_ip(mapped), IpKey::from_ip(plain));
    }
}
