//! `scripts/extract-vmlinux.sh`, which gives Firecracker the uncompressed
//! kernel ELF inside the guest's bzImage: on the Debian kernel the guest
//! boots (its entry is where the bzImage says the kernel runs), on
//! bzImages made here around a payload of each compression, and on files
//! it must refuse without writing anything.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/extract-vmlinux.sh")
}

/// Runs the script; its stderr on failure.
fn extract(image: &Path, out: &Path) -> anyhow::Result<std::result::Result<(), String>> {
    let o = Command::new("bash")
        .arg(script())
        .arg(image)
        .arg(out)
        .output()
        .context("running extract-vmlinux.sh")?;
    Ok(if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    })
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// An x86-64 ELF header's entry point, or why the bytes are not one.
fn elf_entry(elf: &[u8]) -> anyhow::Result<u64> {
    ensure!(elf.len() >= 64, "{} bytes is no ELF header", elf.len());
    ensure!(&elf[..4] == b"\x7fELF", "no ELF magic: {:02x?}", &elf[..4]);
    ensure!(elf[4] == 2 && elf[5] == 1, "not 64-bit little-endian");
    ensure!(
        u16_at(elf, 16) == 2,
        "e_type {} is not EXEC",
        u16_at(elf, 16)
    );
    ensure!(
        u16_at(elf, 18) == 62,
        "e_machine {} is not x86-64",
        u16_at(elf, 18)
    );
    Ok(u64_at(elf, 24))
}

#[test]
fn the_guest_kernel_gives_an_elf_entered_where_the_bzimage_says() -> anyhow::Result<()> {
    let guest = stacyvm_provider::microvm::GuestAssets::default_dir();
    let bz_path = guest.join("vmlinuz");
    let bz = std::fs::read(&bz_path).with_context(|| {
        format!(
            "reading {} (scripts/build-guest.sh makes it)",
            bz_path.display()
        )
    })?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("vmlinux");
    if let Err(e) = extract(&bz_path, &out)? {
        bail!("extracting {} failed: {e}", bz_path.display());
    }
    let elf = std::fs::read(&out)?;
    // pref_address: where the kernel runs once unpacked, which is where
    // the ELF's entry (startup_64) is.
    let pref = u64_at(&bz, 0x258);
    let entry = elf_entry(&elf)?;
    ensure!(
        entry == pref,
        "entry {entry:#x}, the bzImage says {pref:#x}"
    );
    // The same kernel: the release the guest reports is in the ELF.
    let release = std::fs::read_to_string(guest.join("kernel-release"))?;
    let needle = format!("Linux version {}", release.trim());
    ensure!(
        elf.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "the ELF does not hold {needle:?}"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    ensure!(
        names == ["vmlinux"],
        "left in the output directory: {names:?}"
    );
    Ok(())
}

/// A bzImage of boot protocol 2.15 around `payload` (compressed, with the
/// 4-byte uncompressed size the kernel's build appends).
fn bzimage(payload: &[u8], unpacked: usize) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut b = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    b[0x1f1] = setup_sects;
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    let offset = 0x40u32;
    let len = u32::try_from(payload.len() + 4).unwrap_or(u32::MAX);
    b[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
    b[0x24c..0x250].copy_from_slice(&len.to_le_bytes());
    b.resize(b.len() + offset as usize, 0xcc);
    b.extend_from_slice(payload);
    b.extend_from_slice(&u32::try_from(unpacked).unwrap_or(u32::MAX).to_le_bytes());
    // Whatever follows the payload in a real bzImage.
    b.extend_from_slice(&[0x90; 300]);
    b
}

/// A small x86-64 ELF header with `entry`, padded.
fn fake_elf(entry: u64) -> Vec<u8> {
    let mut e = vec![0u8; 4096];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2;
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes());
    e[18..20].copy_from_slice(&62u16.to_le_bytes());
    e[24..32].copy_from_slice(&entry.to_le_bytes());
    e[100..120].copy_from_slice(b"Linux version 9.9.9 ");
    e
}

fn compress(tool: &[&str], data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {} (install it)", tool[0]))?;
    child.stdin.take().context("stdin")?.write_all(data)?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "{} failed", tool[0]);
    Ok(out.stdout)
}

#[test]
fn each_compression_is_unpacked_and_bad_images_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let elf = fake_elf(0x0100_0000);
    for tool in [
        &["gzip", "-c"][..],
        &["xz", "-c", "--check=crc32"],
        &["zstd", "-c", "-q"],
        &["lz4", "-c", "-l", "-q"],
        &["bzip2", "-c"],
        &["lzma", "-c"],
    ] {
        let img = dir.path().join(format!("bz-{}", tool[0]));
        std::fs::write(&img, bzimage(&compress(tool, &elf)?, elf.len()))?;
        let out = dir.path().join(format!("vmlinux-{}", tool[0]));
        if let Err(e) = extract(&img, &out)? {
            bail!("the {}-compressed payload: {e}", tool[0]);
        }
        ensure!(
            std::fs::read(&out)? == elf,
            "{}: another ELF came out",
            tool[0]
        );
    }

    // Refused, and nothing written: not a bzImage, a payload that is no
    // ELF, one whose size disagrees with the trailer, one that runs past
    // the end, and an unknown compression.
    let not_elf = vec![0x42u8; 4096];
    let gz_not_elf = compress(&["gzip", "-c"], &not_elf)?;
    let gz_elf = compress(&["gzip", "-c"], &elf)?;
    let mut past_end = bzimage(&gz_elf, elf.len());
    past_end.truncate(1024 + 0x40 + gz_elf.len() / 2);
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "not-bz",
            b"#!/bin/sh\necho hi\n".repeat(60),
            "not a bzImage",
        ),
        (
            "not-elf",
            bzimage(&gz_not_elf, not_elf.len()),
            "not a 64-bit ELF",
        ),
        (
            "wrong-size",
            bzimage(&gz_elf, elf.len() + 1),
            "the bzImage says",
        ),
        ("past-end", past_end, "beyond its end"),
        (
            "unknown",
            bzimage(&[0xab; 512], 512),
            "no known compression",
        ),
    ];
    for (name, bytes, why) in cases {
        let img = dir.path().join(name);
        std::fs::write(&img, bytes)?;
        let out = dir.path().join(format!("out-{name}"));
        match extract(&img, &out)? {
            Ok(()) => bail!("{name}: extracted"),
            Err(e) => ensure!(e.contains(why), "{name}: {e:?} does not say {why:?}"),
        }
        ensure!(!out.exists(), "{name}: an output was written");
    }
    let stray: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".vmlinux"))
        .map(|e| e.file_name())
        .collect();
    ensure!(stray.is_empty(), "temporary files left: {stray:?}");
    Ok(())
}
