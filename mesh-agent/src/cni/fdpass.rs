//! A message with one file descriptor over a unix socket (`SCM_RIGHTS`): how the
//! plugin hands the agent a pod's network namespace without naming it by a path.
#![expect(unsafe_code, reason = "a descriptor received with SCM_RIGHTS becomes an OwnedFd, which takes unsafe")]

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Sends `bytes` with `fd` attached, in one message.
pub fn send_with_fd(socket: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw.as_ref().map(|r| vec![ControlMessage::ScmRights(r)]).unwrap_or_default();
    let sent =
        sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).map_err(std::io::Error::from)?;
    if sent != bytes.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "message sent in part"));
    }
    Ok(())
}

/// Receives one message into `buf`: its length and the descriptor that came with it.
/// Extra descriptors are closed; none outlives this call unowned.
pub fn recv_with_fd(socket: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let msg = recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel installed each of these descriptors in this process for
            // this message alone; nothing else owns them, so each is owned exactly once.
            fds.extend(received.into_iter().map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) || msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "message or its descriptors truncated"));
    }
    let len = msg.bytes;
    let first = (!fds.is_empty()).then(|| fds.swap_remove(0));
    Ok((len, first))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn a_descriptor_crosses_with_its_message() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        send_with_fd(a.as_fd(), b"hello", Some(file.as_fd())).unwrap();
        let mut buf = [0u8; 64];
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let got = std::fs::File::from(fd.expect("a descriptor"));
        assert_eq!(got.metadata().unwrap().ino(), file.metadata().unwrap().ino());

        send_with_fd(a.as_fd(), b"bye", None).unwrap();
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], fd.is_none()), (&b"bye"[..], true));
    }
}
