//! Network interfaces set with the classic ioctls, for code that has no `ip` to run: the guest
//! init (`lo`, `eth0`) and an exec with no network (its own namespace's `lo`).

pub fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = b as libc::c_char;
    }
    req
}

#[derive(Debug)]
pub struct Socket(i32);

impl Socket {
    /// An IPv4 datagram socket, for the interface ioctls.
    pub fn inet() -> Result<Socket, String> {
        // SAFETY: socket takes no pointers.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        Ok(Socket(fd))
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this value.
        unsafe { libc::close(self.0) };
    }
}

pub fn ioctl<T>(
    sock: &Socket,
    request: libc::c_ulong,
    arg: &mut T,
    what: &str,
) -> Result<(), String> {
    // SAFETY: `arg` is the structure this request reads or writes, valid for the call.
    let rc = unsafe { libc::ioctl(sock.0, request as _, arg as *mut T) };
    if rc < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

pub fn up(sock: &Socket, name: &str) -> Result<(), String> {
    let mut req = ifreq(name);
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        &mut req,
        &format!("flags of {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("bring {name} up"),
    )
}

/// Moves the calling process into a network namespace of its own with only loopback, up: what
/// a build step with `--network=none` runs in. Needs `CAP_SYS_ADMIN` in its user namespace.
pub fn isolate_with_loopback() -> Result<(), String> {
    // SAFETY: unshare takes flags and changes only this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "cannot make a network namespace: {}",
            std::io::Error::last_os_error()
        ));
    }
    up(&Socket::inet()?, "lo")
}
