//! A pre-copy round's file (image kind Pages): the pages of a process's memory runs, read
//! while it runs, as PageMap/PageData pairs. `mig` writes it straight into the stream to
//! the target, reading the pages itself (the process only says which runs, shim/src/precopy.rs).

use crate::image::{ImageWriter, PAGE, PageMap, Tag};
use std::io::{Result, Write};

/// Pages read and written at a time.
pub const RUN: usize = 1024;

/// Pages `start..end` read with `read` (the app runs: a page may change while read, and
/// then counts as written for the next round) and written as PageMap/PageData pairs, in
/// pieces of at most `buf.len()` bytes (a multiple of the page size); zero pages are left
/// out when `skip_zero`. Returns the pages written; fails if part of the range cannot be
/// read (what was written before stays written).
pub fn write_run<W: Write>(
    w: &mut ImageWriter<W>,
    (start, end): (u64, u64),
    skip_zero: bool,
    buf: &mut [u8],
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<u64> {
    let mut pages = 0;
    let mut at = start;
    while at < end {
        let count = ((end - at) as usize / PAGE).min(buf.len() / PAGE);
        let len = count * PAGE;
        read(at, &mut buf[..len])?;
        let mut present = vec![0u64; count.div_ceil(64)];
        let mut n = 0;
        for i in 0..count {
            let page = i * PAGE;
            if skip_zero && buf[page..page + PAGE].iter().all(|&b| b == 0) {
                continue;
            }
            if n != i {
                buf.copy_within(page..page + PAGE, n * PAGE);
            }
            present[i / 64] |= 1 << (i % 64);
            n += 1;
        }
        if n > 0 {
            let map = PageMap {
                start: at,
                count: count as u64,
                present,
            };
            w.postcard(Tag::PageMap, &map)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            w.section(Tag::PageData, &buf[..n * PAGE])?;
            pages += n as u64;
        }
        at += len as u64;
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ImageReader, Kind};

    #[test]
    fn a_run_is_written_in_pieces_without_its_zero_pages() {
        // Five pages at 0x10000, the second zero; read two pages at a time.
        let mem: Vec<u8> = (0..5 * PAGE)
            .map(|i| {
                if i / PAGE == 1 {
                    0
                } else {
                    (i / PAGE + 1) as u8
                }
            })
            .collect();
        let base = 0x10000u64;
        let mut read = |addr: u64, out: &mut [u8]| {
            let at = (addr - base) as usize;
            out.copy_from_slice(&mem[at..at + out.len()]);
            Ok(())
        };
        let mut w = ImageWriter::new(Vec::new(), Kind::Pages).unwrap();
        let mut buf = vec![0u8; 2 * PAGE];
        let n = write_run(
            &mut w,
            (base, base + 5 * PAGE as u64),
            true,
            &mut buf,
            &mut read,
        );
        assert_eq!(n.unwrap(), 4);
        let file = w.finish().unwrap();
        let mut r = ImageReader::new(&file[..], std::path::Path::new("round")).unwrap();
        let mut maps = Vec::new();
        let mut data = Vec::new();
        while let Some(s) = r.next_section().unwrap() {
            match s.tag {
                Tag::PageMap => maps.push(s.decode::<PageMap>("round".as_ref()).unwrap()),
                Tag::PageData => data.extend_from_slice(&s.payload),
                _ => {}
            }
        }
        let starts: Vec<u64> = maps.iter().map(|m| m.start).collect();
        assert_eq!(
            starts,
            [base, base + 2 * PAGE as u64, base + 4 * PAGE as u64]
        );
        assert_eq!(maps[0].present, [0b01]);
        let firsts: Vec<u8> = data.chunks(PAGE).map(|p| p[0]).collect();
        assert_eq!(firsts, [1, 3, 4, 5]);
        // A range that cannot be read fails.
        let mut fail = |_: u64, _: &mut [u8]| Err(std::io::Error::other("gone"));
        let mut w = ImageWriter::new(Vec::new(), Kind::Pages).unwrap();
        assert!(
            write_run(
                &mut w,
                (base, base + PAGE as u64),
                true,
                &mut buf,
                &mut fail
            )
            .is_err()
        );
    }
}
