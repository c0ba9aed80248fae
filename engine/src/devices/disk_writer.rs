//! A disk for the built-in guest: the VMM writes blocks into an image through the same
//! storage backend a virtio-blk disk uses ([`DiskImage::write_at`]: dirty-block tracking and
//! active mirroring included), at a chosen rate and pattern, so host tests and benchmarks
//! exercise storage migration without a Linux guest.
//!
//! Its state (position, blocks written, pattern state) is one section; a migrated writer
//! continues where it stopped. Quiesce parks the writer between two writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::MigratableDevice;
use crate::storage::image::DiskImage;
use crate::storage::VmDisk;
use crate::vm::{DeviceDescriptor, DeviceSection, Pattern, VmError};

/// Descriptor kind of the device.
pub const KIND: &str = "host-disk";
/// Section id of the writer's state.
pub const SECTION: u32 = 0x400;
/// Bytes per write.
pub const WRITE_BYTES: u64 = 64 << 10;
/// Largest rate, MB/s.
pub const MAX_RATE_MB_S: f64 = 100_000.0;
const SECTION_VERSION: u32 = 1;
const SECTION_LEN: usize = 32;
/// The writer's pacing period.
const TICK: Duration = Duration::from_millis(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the writer does.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskWriterSpec {
    /// The image.
    pub path: PathBuf,
    /// Writes per second, in MB/s (10^6 bytes; 0: the disk is attached but idle).
    pub rate_mb_s: f64,
    /// Where writes go: sequential blocks, uniformly random ones, or 90 % into the first
    /// tenth of the span.
    pub pattern: Pattern,
    /// The region written, MiB from the start of the disk (0: the whole disk).
    pub span_mib: u64,
}

impl DiskWriterSpec {
    /// Checks the settings (not the image).
    pub fn validate(&self) -> Result<(), VmError> {
        if !(0.0..=MAX_RATE_MB_S).contains(&self.rate_mb_s) || !self.rate_mb_s.is_finite() {
            return Err(VmError::InvalidSpec(format!(
                "disk write rate {} MB/s (0..={MAX_RATE_MB_S})",
                self.rate_mb_s
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct WriterState {
    /// Next block (sequential) or pattern state (random, hotspot).
    position: u64,
    /// Blocks written so far.
    blocks: u64,
    /// xorshift state of the content.
    seed: u64,
    /// Fractional bytes owed by the pacing.
    debt: u64,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Run {
    Created,
    Running,
    Paused,
    Stopped,
}

struct Shared {
    run: Mutex<(Run, bool)>,
    cv: Condvar,
    state: Mutex<WriterState>,
}

/// The built-in guest's disk and the VMM thread writing it.
pub struct DiskWriter {
    id: String,
    image: Arc<DiskImage>,
    spec: DiskWriterSpec,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for DiskWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskWriter")
            .field("id", &self.id)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl DiskWriter {
    /// Opens the image of `spec` (locked unless `unlocked`, as a destination opens it) and
    /// makes a writer that starts on the first resume.
    pub fn open(id: &str, spec: &DiskWriterSpec, unlocked: bool) -> Result<DiskWriter, VmError> {
        spec.validate()?;
        let image = DiskImage::open(&spec.path, false, unlocked)
            .map_err(|e| VmError::InvalidSpec(format!("disk {id}: {e}")))?;
        if image.size() < WRITE_BYTES {
            return Err(VmError::InvalidSpec(format!(
                "disk {id}: {} bytes is smaller than one {WRITE_BYTES}-byte write",
                image.size()
            )));
        }
        if spec.span_mib << 20 > image.size() {
            return Err(VmError::InvalidSpec(format!(
                "disk {id}: a write span of {} MiB exceeds the disk ({} MiB)",
                spec.span_mib,
                image.size() >> 20
            )));
        }
        Ok(DiskWriter {
            id: id.to_string(),
            image: Arc::new(image),
            spec: spec.clone(),
            shared: Arc::new(Shared {
                run: Mutex::new((Run::Created, true)),
                cv: Condvar::new(),
                state: Mutex::new(WriterState {
                    seed: 0x9e37_79b9_7f4a_7c15,
                    ..WriterState::default()
                }),
            }),
            thread: Mutex::new(None),
        })
    }

    /// The writer a source described (`descriptor`), on the image at `path` here (or the
    /// source's path), opened unlocked: the migration takes the lock at the switchover.
    pub fn from_descriptor(
        d: &DeviceDescriptor,
        path: Option<&Path>,
    ) -> Result<DiskWriter, VmError> {
        let bad = |m: String| VmError::InvalidSpec(format!("device {} ({KIND}): {m}", d.id));
        let prop = |k: &str| {
            d.properties
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| bad(format!("no {k:?} property")))
        };
        let spec = DiskWriterSpec {
            path: path.map_or_else(|| prop("path").map(PathBuf::from), |p| Ok(p.to_path_buf()))?,
            rate_mb_s: prop("rate-mb-s")?
                .parse()
                .map_err(|_| bad("bad rate".into()))?,
            pattern: prop("pattern")?.parse().map_err(bad)?,
            span_mib: prop("span-mib")?
                .parse()
                .map_err(|_| bad("bad span".into()))?,
        };
        let size: u64 = prop("size")?.parse().map_err(|_| bad("bad size".into()))?;
        let w = DiskWriter::open(&d.id, &spec, true)?;
        if w.image.size() != size {
            return Err(bad(format!(
                "{} is {} bytes here but {size} bytes at the source",
                spec.path.display(),
                w.image.size()
            )));
        }
        Ok(w)
    }

    /// The writer among a built-in guest's devices, if it has one, on this host's image
    /// (`overrides`: `(disk id, path)`); any other device kind is refused.
    pub fn from_devices(
        devices: &[DeviceDescriptor],
        overrides: &[(String, PathBuf)],
    ) -> Result<Option<DiskWriter>, VmError> {
        let mut writer = None;
        for d in devices {
            if d.kind != KIND || writer.is_some() {
                return Err(VmError::InvalidSpec(format!(
                    "device {} ({}): the built-in guest has one {KIND} device and nothing else",
                    d.id, d.kind
                )));
            }
            let path = overrides
                .iter()
                .find(|(id, _)| *id == d.id)
                .map(|(_, p)| p.as_path());
            writer = Some(DiskWriter::from_descriptor(d, path)?);
        }
        Ok(writer)
    }

    /// How a destination rebuilds it.
    pub fn descriptor(&self) -> DeviceDescriptor {
        DeviceDescriptor {
            kind: KIND.into(),
            id: self.id.clone(),
            properties: vec![
                ("path".into(), self.image.path().display().to_string()),
                ("size".into(), self.image.size().to_string()),
                ("read-only".into(), "false".into()),
                ("rate-mb-s".into(), self.spec.rate_mb_s.to_string()),
                ("pattern".into(), self.spec.pattern.to_string()),
                ("span-mib".into(), self.spec.span_mib.to_string()),
            ],
        }
    }

    /// The disk, for the migration.
    pub fn disk(&self) -> VmDisk {
        VmDisk {
            id: self.id.clone(),
            image: self.image.clone(),
        }
    }

    /// Blocks written so far (it keeps counting after a migration).
    pub fn blocks_written(&self) -> u64 {
        lock(&self.shared.state).blocks
    }

    /// Stops the writer for good.
    pub fn stop(&self) {
        self.set(Run::Stopped);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }

    /// Sets the run state and, for anything but running, waits until no write is in flight.
    fn set(&self, run: Run) {
        let mut r = lock(&self.shared.run);
        r.0 = run;
        self.shared.cv.notify_all();
        if run != Run::Running && lock(&self.thread).is_some() {
            while !r.1 {
                r = self
                    .shared
                    .cv
                    .wait(r)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    fn spawn(&self) -> Result<(), VmError> {
        let mut t = lock(&self.thread);
        if t.is_some() {
            return Ok(());
        }
        let shared = self.shared.clone();
        let image = self.image.clone();
        let spec = self.spec.clone();
        let span_blocks = match self.spec.span_mib {
            0 => self.image.size() / WRITE_BYTES,
            mib => (mib << 20) / WRITE_BYTES,
        }
        .max(1);
        *t = Some(
            std::thread::Builder::new()
                .name(format!("disk-writer-{}", self.id))
                .spawn(move || writer_loop(&shared, &image, &spec, span_blocks))
                .map_err(|e| VmError::InvalidSpec(format!("cannot start the disk writer: {e}")))?,
        );
        Ok(())
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn writer_loop(shared: &Shared, image: &DiskImage, spec: &DiskWriterSpec, span: u64) {
    let per_tick = (spec.rate_mb_s * 1e6 * TICK.as_secs_f64()) as u64;
    let mut buf = vec![0u8; WRITE_BYTES as usize];
    let mut next = Instant::now();
    loop {
        {
            let mut r = lock(&shared.run);
            loop {
                match r.0 {
                    Run::Running => break,
                    Run::Stopped => {
                        r.1 = true;
                        shared.cv.notify_all();
                        return;
                    }
                    Run::Created | Run::Paused => {
                        r.1 = true;
                        shared.cv.notify_all();
                        r = shared.cv.wait(r).unwrap_or_else(PoisonError::into_inner);
                        next = Instant::now();
                    }
                }
            }
            r.1 = false;
        }
        // One tick's worth of writes, between two checks of the run state.
        let mut st = *lock(&shared.state);
        st.debt += per_tick;
        while st.debt >= WRITE_BYTES {
            st.debt -= WRITE_BYTES;
            let block = match spec.pattern {
                Pattern::Sequential => {
                    st.position = (st.position + 1) % span;
                    st.position
                }
                Pattern::Random => {
                    if st.position == 0 {
                        st.position = 0x2545_f491_4f6c_dd1d;
                    }
                    xorshift(&mut st.position) % span
                }
                Pattern::Hotspot => {
                    let r = xorshift(&mut st.seed);
                    if r % 10 < 9 {
                        (r >> 8) % (span / 10).max(1)
                    } else {
                        (r >> 8) % span
                    }
                }
            };
            for w in buf.chunks_exact_mut(8) {
                w.copy_from_slice(&xorshift(&mut st.seed).to_le_bytes());
            }
            buf[..8].copy_from_slice(&st.blocks.to_le_bytes());
            if image.write_at(&buf, block * WRITE_BYTES).is_err() {
                tracing::warn!("disk writer: a write failed");
            }
            st.blocks += 1;
        }
        *lock(&shared.state) = st;
        {
            let mut r = lock(&shared.run);
            r.1 = true;
            shared.cv.notify_all();
        }
        next += TICK;
        let now = Instant::now();
        if next > now {
            let r = lock(&shared.run);
            let _ = shared
                .cv
                .wait_timeout_while(r, next - now, |r| r.0 == Run::Running);
        } else {
            next = now;
        }
    }
}

impl MigratableDevice for DiskWriter {
    fn name(&self) -> &str {
        &self.id
    }

    fn section_ids(&self) -> &[u32] {
        &[SECTION]
    }

    fn save(&self) -> Result<Vec<DeviceSection>, VmError> {
        let s = *lock(&self.shared.state);
        let mut data = Vec::with_capacity(SECTION_LEN);
        for v in [s.position, s.blocks, s.seed, s.debt] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Ok(vec![DeviceSection {
            id: SECTION,
            instance: 0,
            version: SECTION_VERSION,
            data,
        }])
    }

    fn check(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        let bad = |reason: String| VmError::State {
            id: SECTION,
            instance: 0,
            reason,
        };
        match sections {
            [s] if s.version != SECTION_VERSION => {
                Err(bad(format!("version {} (this build reads 1)", s.version)))
            }
            [s] if s.instance != 0 || s.data.len() != SECTION_LEN => Err(bad(format!(
                "instance {} with {} bytes",
                s.instance,
                s.data.len()
            ))),
            [_] => Ok(()),
            _ => Err(bad(format!(
                "{} sections for one disk writer",
                sections.len()
            ))),
        }
    }

    fn restore(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        self.check(sections)?;
        let d = &sections[0].data;
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&d[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        *lock(&self.shared.state) = WriterState {
            position: word(0),
            blocks: word(1),
            seed: word(2).max(1),
            debt: word(3).min(WRITE_BYTES),
        };
        Ok(())
    }

    fn quiesce(&self) -> Result<(), VmError> {
        self.set(Run::Paused);
        self.image.flush().map_err(|e| VmError::State {
            id: SECTION,
            instance: 0,
            reason: format!("flushing {}: {e}", self.image.path().display()),
        })
    }

    fn resume(&self) -> Result<(), VmError> {
        self.spawn()?;
        self.set(Run::Running);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_at_its_rate_pauses_and_continues_from_its_state() {
        let dir = std::env::temp_dir().join(format!("livemig-dw-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("d.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let spec = DiskWriterSpec {
            path: p.clone(),
            rate_mb_s: 20.0,
            pattern: Pattern::Random,
            span_mib: 8,
        };
        let w = DiskWriter::open("d0", &spec, false).unwrap();
        w.image.start_tracking();
        w.resume().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        w.quiesce().unwrap();
        let n = w.blocks_written();
        // 20 MB/s for 0.3 s is ~90 blocks of 64 KiB; a loaded machine writes fewer.
        assert!((10..=150).contains(&n), "{n} blocks");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(w.blocks_written(), n, "no write while quiesced");
        let dirty = w.image.take_dirty();
        let pages: u32 = dirty.iter().map(|x| x.count_ones()).sum();
        assert!(pages > 0 && u64::from(pages) <= n * 16);
        // Writes stay inside the span.
        assert!(dirty[(8 << 20) / 4096 / 64..].iter().all(|x| *x == 0));
        let saved = w.save().unwrap();
        w.stop();
        drop(w);
        let w2 = DiskWriter::open("d0", &spec, false).unwrap();
        w2.check(&[&saved[0]]).unwrap();
        w2.restore(&[&saved[0]]).unwrap();
        assert_eq!(w2.blocks_written(), n);
        let mut bad = saved[0].clone();
        bad.data.pop();
        assert!(w2.check(&[&bad]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
