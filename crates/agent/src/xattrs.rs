//! A file's `user.*` extended attributes: read into its entry, and set on a
//! file as it is written. Never followed through a symbolic link.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use stacyvm_core::files::{MAX_XATTRS, MAX_XATTR_VALUE};
use stacyvm_core::{Error, Result};

/// The namespace of the attributes read and written.
const PREFIX: &str = "user.";
/// Longest attribute name the kernel takes.
const MAX_NAME: usize = 255;

/// `host`'s `user.*` attributes with UTF-8 values of at most
/// [`MAX_XATTR_VALUE`] bytes, [`MAX_XATTRS`] of them at most. A file system
/// without extended attributes has none.
pub fn read(host: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(path) = CString::new(host.as_os_str().as_bytes()) else {
        return out;
    };
    let mut names = vec![0u8; 4096];
    // SAFETY: the buffer is valid for its length; the path is NUL-terminated.
    let mut n = unsafe { libc::llistxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE) {
        // SAFETY: as above; a zero size asks for the length.
        let need = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
        if need <= 0 || need as usize > 1 << 20 {
            return out;
        }
        names.resize(need as usize, 0);
        // SAFETY: as above.
        n = unsafe { libc::llistxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    }
    if n <= 0 {
        return out;
    }
    let mut value = vec![0u8; MAX_XATTR_VALUE];
    for name in names[..n as usize].split(|b| *b == 0) {
        if out.len() >= MAX_XATTRS {
            break;
        }
        let Ok(text) = std::str::from_utf8(name) else {
            continue;
        };
        if !text.starts_with(PREFIX) {
            continue;
        }
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        // SAFETY: both strings are NUL-terminated; the buffer is valid for
        // its length.
        let got = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if got < 0 {
            continue;
        }
        if let Ok(v) = std::str::from_utf8(&value[..got as usize]) {
            out.insert(text.to_owned(), v.to_owned());
        }
    }
    out
}

/// Checks attributes a client asks to set.
pub fn check(attrs: &BTreeMap<String, String>) -> Result<()> {
    if attrs.len() > MAX_XATTRS {
        return Err(Error::InvalidRequest(format!(
            "at most {MAX_XATTRS} extended attributes may be set on a file"
        )));
    }
    for (k, v) in attrs {
        let suffix = k.strip_prefix(PREFIX).unwrap_or("");
        if suffix.is_empty() || k.len() > MAX_NAME || k.contains('\0') {
            return Err(Error::InvalidRequest(format!(
                "extended attribute {k:?} is not a user.* name of at most {MAX_NAME} bytes"
            )));
        }
        if v.len() > MAX_XATTR_VALUE {
            return Err(Error::InvalidRequest(format!(
                "extended attribute {k:?} is longer than {MAX_XATTR_VALUE} bytes"
            )));
        }
    }
    Ok(())
}

/// Sets `attrs` on an open file.
pub fn set(file: &std::fs::File, logical: &str, attrs: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in attrs {
        let name = CString::new(k.as_bytes())
            .map_err(|_| Error::InvalidRequest(format!("extended attribute {k:?} has a NUL")))?;
        // SAFETY: the fd is open; the name is NUL-terminated; the value
        // pointer is valid for its length.
        let rc = unsafe {
            libc::fsetxattr(
                file.as_raw_fd(),
                name.as_ptr(),
                v.as_ptr().cast(),
                v.len(),
                0,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOTSUP) => Error::Unsupported(format!(
                    "{logical}: this sandbox's file system keeps no extended attributes"
                )),
                Some(libc::ENOSPC) | Some(libc::E2BIG) => Error::InvalidRequest(format!(
                    "{logical}: the extended attributes do not fit on the file"
                )),
                _ => crate::root::io_error(logical, e),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_attributes_round_trip_and_bad_ones_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        let f = std::fs::File::create(&p).expect("file");
        let mut attrs = BTreeMap::new();
        attrs.insert("user.e2b.owner".to_owned(), "me".to_owned());
        attrs.insert("user.empty".to_owned(), String::new());
        check(&attrs).expect("valid");
        set(&f, "/f", &attrs)
            .expect("set (the test's temporary directory must keep user.* attributes)");
        assert_eq!(read(&p), attrs);
        for bad in ["trusted.x", "user.", "owner"] {
            let one = BTreeMap::from([(bad.to_owned(), "v".to_owned())]);
            assert!(check(&one).is_err(), "{bad}");
        }
        let long = BTreeMap::from([("user.x".to_owned(), "v".repeat(MAX_XATTR_VALUE + 1))]);
        assert!(check(&long).is_err());
    }
}
