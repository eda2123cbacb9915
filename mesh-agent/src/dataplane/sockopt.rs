//! The socket facts the kernel splice needs that no safe wrapper offers: a socket's
//! cookie (its key in the splice tables), a nudge that makes the kernel look at bytes
//! already queued, a receive buffer above the system's cap, and how many bytes a
//! socket has been given to send.
#![expect(unsafe_code, reason = "getsockopt, setsockopt and ioctl on sockets the caller owns")]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `SO_COOKIE` (asm-generic/socket.h), not in every libc version.
const SO_COOKIE: libc::c_int = 57;

/// The kernel's cookie of `socket`: unique while the kernel runs, what BPF programs
/// see as `bpf_get_socket_cookie`.
pub fn cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `socket` is a valid open fd for the call; value and len point to a u64
    // and its size, which the kernel writes at most.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_COOKIE, (&raw mut value).cast(), &raw mut len)
    };
    if rc == 0 { Ok(value) } else { Err(io::Error::last_os_error()) }
}

/// Sets `SO_RCVLOWAT` to one byte. Setting it makes TCP signal "data ready" at once
/// when bytes are queued: bytes that arrived before the socket joined the splice table
/// are handed to the verdict program then, instead of waiting for the next segment.
pub fn signal_queued(socket: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid fd, and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sets the receive buffer of `socket` to `bytes` (the kernel doubles it for its
/// bookkeeping), past `net.core.rmem_max` where the agent holds `CAP_NET_ADMIN`
/// (`SO_RCVBUFFORCE`), else up to that cap (`SO_RCVBUF`). Either turns the buffer's
/// autotuning off for this socket.
pub fn set_receive_buffer(socket: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |option| {
        // SAFETY: a valid fd, and a c_int option value of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    };
    set(libc::SO_RCVBUFFORCE).or_else(|_| set(libc::SO_RCVBUF))
}

/// Bytes ever queued for sending on the TCP `socket`: acknowledged by the peer
/// (`tcpi_bytes_acked`) plus still in the send queue (`SIOCOUTQ`). Counted from the
/// connection's start, with the SYN's sequence number included on some paths: compare
/// differences, not absolute values.
pub fn bytes_queued_to_send(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let info = tcp_info(socket)?;
    let mut unacked: libc::c_int = 0;
    // SAFETY: a valid fd; SIOCOUTQ (TIOCOUTQ) writes one c_int.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &raw mut unacked) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + u64::try_from(unacked).unwrap_or(0))
}

/// Sequence space the TCP `socket` has received in order (`tcpi_bytes_received`):
/// its data bytes, plus one once the peer's FIN is in.
pub fn sequence_received(socket: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(tcp_info(socket)?.tcpi_bytes_received)
}

fn tcp_info(socket: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd; info and len describe a tcp_info the kernel fills up to len.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}
