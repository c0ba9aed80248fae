//! The 8250 UART (COM1 at port 0x3f8, IRQ 4): vm-superio's `Serial`, its output going to the
//! VM's [`Console`], its input fed from the console's clients. It migrates its registers and
//! receive FIFO as one section.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::bus::{BusDevice, VmAction};
use super::{IrqLine, MigratableDevice};
use crate::vm::{DeviceSection, VmError};

/// I/O port base of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Ports of a UART.
pub const PORTS: u64 = 8;
/// GSI of COM1.
pub const COM1_GSI: u32 = 4;
/// Section id of the UART's state.
pub const SECTION_UART: u32 = 0x200;
/// Version of [`SECTION_UART`].
pub const SECTION_VERSION: u32 = 1;
/// Console output kept for clients that connect later, in bytes.
pub const HISTORY_BYTES: usize = 256 << 10;
/// Most bytes of pending input (beyond the UART's FIFO).
const MAX_PENDING_INPUT: usize = 64 << 10;
/// IIR bit 0: set when no interrupt is pending.
const IIR_NONE: u8 = 1;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the guest's console goes: a history for late clients, an optional log file, stdout
/// if asked, and live subscribers (`livemig console`).
pub struct Console {
    inner: Mutex<ConsoleInner>,
    written: std::sync::atomic::AtomicU64,
}

struct ConsoleInner {
    history: VecDeque<u8>,
    log: Option<File>,
    stdout: bool,
    subscribers: Vec<crossbeam_channel::Sender<Vec<u8>>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Console")
    }
}

impl Console {
    /// A console writing to `log` (if any) and to stdout when `stdout`.
    pub fn new(log: Option<File>, stdout: bool) -> Arc<Console> {
        Arc::new(Console {
            inner: Mutex::new(ConsoleInner {
                history: VecDeque::new(),
                log,
                stdout,
                subscribers: Vec::new(),
            }),
            written: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Bytes the guest wrote so far.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records guest output.
    pub fn write(&self, bytes: &[u8]) {
        self.written
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut c = lock(&self.inner);
        c.history.extend(bytes);
        let excess = c.history.len().saturating_sub(HISTORY_BYTES);
        c.history.drain(..excess);
        if let Some(f) = c.log.as_mut() {
            let _ = f.write_all(bytes);
        }
        if c.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
        // A subscriber that went away (or stopped reading) is dropped: it never blocks the
        // guest.
        c.subscribers.retain(|s| s.try_send(bytes.to_vec()).is_ok());
    }

    /// The output so far (up to [`HISTORY_BYTES`]) and a channel of what follows.
    pub fn subscribe(&self) -> (Vec<u8>, crossbeam_channel::Receiver<Vec<u8>>) {
        let (tx, rx) = crossbeam_channel::bounded(1024);
        let mut c = lock(&self.inner);
        c.subscribers.push(tx);
        (c.history.iter().copied().collect(), rx)
    }
}

/// The UART's output, into the console.
pub struct ConsoleOut(Arc<Console>);

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}

type SerialDevice = Serial<IrqLine, NoEvents, ConsoleOut>;

/// COM1.
pub struct Uart {
    serial: Mutex<SerialDevice>,
    irq: IrqLine,
    console: Arc<Console>,
    /// Input waiting for room in the FIFO.
    pending: Mutex<VecDeque<u8>>,
}

impl Uart {
    /// A UART raising `irq`, writing to `console`.
    pub fn new(irq: IrqLine, console: Arc<Console>) -> Uart {
        Uart {
            serial: Mutex::new(Serial::new(irq.clone(), ConsoleOut(console.clone()))),
            irq,
            console,
            pending: Mutex::new(VecDeque::new()),
        }
    }

    /// Its interrupt line.
    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }

    /// The console this UART writes to.
    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    /// Queues `bytes` for the guest to read (what does not fit the FIFO waits); false when
    /// too much input is pending already.
    pub fn input(&self, bytes: &[u8]) -> bool {
        {
            let mut p = lock(&self.pending);
            if p.len() + bytes.len() > MAX_PENDING_INPUT {
                return false;
            }
            p.extend(bytes);
        }
        self.feed();
        true
    }

    /// Moves pending input into the FIFO as far as it has room.
    fn feed(&self) {
        let mut serial = lock(&self.serial);
        let mut p = lock(&self.pending);
        let n = serial.fifo_capacity().min(p.len());
        if n > 0 {
            let chunk: Vec<u8> = p.drain(..n).collect();
            let _ = serial.enqueue_raw_bytes(&chunk);
        }
    }
}

impl BusDevice for Uart {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = lock(&self.serial).read(offset as u8);
        }
        for b in data.iter_mut().skip(1) {
            *b = 0;
        }
        // A read of the receive buffer may have made room.
        if offset == 0 {
            self.feed();
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<VmAction> {
        if let Some(&b) = data.first() {
            let _ = lock(&self.serial).write(offset as u8, b);
        }
        None
    }
}

impl MigratableDevice for Uart {
    fn name(&self) -> &str {
        "uart"
    }

    fn section_ids(&self) -> &[u32] {
        &[SECTION_UART]
    }

    fn save(&self) -> Result<Vec<DeviceSection>, VmError> {
        let s = lock(&self.serial).state();
        let mut data = vec![
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ];
        data.extend_from_slice(&(s.in_buffer.len() as u32).to_le_bytes());
        data.extend_from_slice(&s.in_buffer);
        Ok(vec![DeviceSection {
            id: SECTION_UART,
            instance: 0,
            version: SECTION_VERSION,
            data,
        }])
    }

    fn check(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        decode(sections).map(|_| ())
    }

    fn restore(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        let state = decode(sections)?;
        let restored = Serial::from_state(
            &state,
            self.irq.clone(),
            NoEvents,
            ConsoleOut(self.console.clone()),
        )
        .map_err(|e| err(format!("cannot restore: {e:?}")))?;
        *lock(&self.serial) = restored;
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        // The UART raises an edge only when an interrupt becomes pending, never again while
        // it stays pending (unread). An edge raised just before the pause may not have reached
        // this side's interrupt controller (KVM injects a legacy irqfd from a work queue), and
        // the one vm-superio raises on restore can land before the irqchip and LAPIC state is
        // restored over it: the guest would wait forever, its console output stuck. Raise it
        // again now, after every restore; the driver reads IIR and takes a spare edge for
        // nothing.
        let pending = lock(&self.serial).state().interrupt_identification & IIR_NONE == 0;
        if pending {
            let _ = self.irq.trigger();
        }
        Ok(())
    }
}

fn err(reason: String) -> VmError {
    VmError::State {
        id: SECTION_UART,
        instance: 0,
        reason,
    }
}

/// The UART's one section, decoded and checked.
fn decode(sections: &[&DeviceSection]) -> Result<SerialState, VmError> {
    let [s] = sections else {
        return Err(err(format!("{} sections, expected 1", sections.len())));
    };
    if s.instance != 0 || s.version != SECTION_VERSION {
        return Err(err(format!(
            "instance {} version {} (expected 0, {SECTION_VERSION})",
            s.instance, s.version
        )));
    }
    let d = &s.data;
    if d.len() < 13 {
        return Err(err(format!("{} bytes, too short", d.len())));
    }
    let n = u32::from_le_bytes([d[9], d[10], d[11], d[12]]) as usize;
    // The FIFO holds 64 bytes.
    if n > 64 || d.len() != 13 + n {
        return Err(err(format!(
            "receive buffer of {n} bytes in a section of {}",
            d.len()
        )));
    }
    Ok(SerialState {
        baud_divisor_low: d[0],
        baud_divisor_high: d[1],
        interrupt_enable: d[2],
        interrupt_identification: d[3],
        line_control: d[4],
        line_status: d[5],
        modem_control: d[6],
        modem_status: d[7],
        scratch: d[8],
        in_buffer: d[13..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_the_console_and_state_round_trips() {
        let console = Console::new(None, false);
        let (_, rx) = console.subscribe();
        let a = Uart::new(IrqLine::new(COM1_GSI).unwrap(), console.clone());
        for b in b"hi\n" {
            a.write(0, &[*b]);
        }
        assert_eq!(rx.try_iter().flatten().collect::<Vec<u8>>(), b"hi\n");
        assert_eq!(console.subscribe().0, b"hi\n");
        assert!(a.input(b"ok"));
        a.write(3, &[0x80]); // DLAB on
        a.write(0, &[0x0c]); // divisor low
        let saved = a.save().unwrap();
        let b = Uart::new(IrqLine::new(COM1_GSI).unwrap(), Console::new(None, false));
        let refs: Vec<&DeviceSection> = saved.iter().collect();
        b.check(&refs).unwrap();
        b.restore(&refs).unwrap();
        assert_eq!(lock(&b.serial).state(), lock(&a.serial).state());
        let mut bad = saved[0].clone();
        bad.data.truncate(5);
        assert!(b.check(&[&bad]).is_err());
        let mut bad = saved[0].clone();
        bad.data[9] = 200;
        assert!(b.check(&[&bad]).is_err());
    }

    /// Edges raised since the last look at `irq`'s eventfd (0 when none).
    fn edges(irq: &IrqLine) -> u64 {
        irq.eventfd().read().unwrap_or(0)
    }

    #[test]
    fn a_pending_interrupt_is_raised_again_on_resume() {
        let irq = IrqLine::new(COM1_GSI).unwrap();
        let a = Uart::new(irq.clone(), Console::new(None, false));
        // Resumed with nothing pending: no edge.
        a.resume().unwrap();
        assert_eq!(edges(&irq), 0);
        // The driver enables the transmit-empty interrupt: one edge, then pending (unread).
        a.write(1, &[0x02]);
        assert_eq!(edges(&irq), 1);
        a.write(1, &[0x02]);
        assert_eq!(edges(&irq), 0, "no second edge while pending");
        // That edge is lost on the way to the destination: its UART raises it again.
        let saved = a.save().unwrap();
        let birq = IrqLine::new(COM1_GSI).unwrap();
        let b = Uart::new(birq.clone(), Console::new(None, false));
        let refs: Vec<&DeviceSection> = saved.iter().collect();
        b.restore(&refs).unwrap();
        // vm-superio raises it on restore, before the interrupt controllers' state is
        // restored over it; what counts is the edge at resume.
        let _ = edges(&birq);
        b.resume().unwrap();
        assert_eq!(edges(&birq), 1);
        // Once the guest read IIR, nothing is pending: a resume raises nothing.
        let mut iir = [0u8];
        b.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "transmit-empty pending");
        b.resume().unwrap();
        assert_eq!(edges(&birq), 0);
    }
}
