//! Latency on a link without `tc netem`: packets that an iptables `NFQUEUE` rule sends
//! to a queue are held here and let through (`NF_ACCEPT`) a fixed time after they
//! arrived, in order. The lab's kernel has no queueing discipline that delays (netem
//! and fq are not built), but it has the netfilter queue.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Longest wait between two looks at the queue: the delay is exact to about this.
const TICK: Duration = Duration::from_micros(500);
/// Packets the kernel may hold for this queue; past that new ones are dropped, as a
/// full link buffer would.
const QUEUE_MAX_LEN: u32 = 16 * 1024;

/// Binds netfilter queue `queue` in the current network namespace and lets each packet
/// through `delay` after it was queued, until killed. Says `ready` on stdout once
/// bound (packets queued before then are let through by the rule's `--queue-bypass`).
pub fn run(queue: u16, delay: Duration) -> anyhow::Result<()> {
    let mut q = nfq::Queue::open().context("opening a netfilter queue socket")?;
    q.bind(queue).with_context(|| format!("binding netfilter queue {queue}"))?;
    // The verdict needs the packet's id only.
    q.set_copy_range(queue, 0).context("asking for packet metadata only")?;
    q.set_queue_max_len(queue, QUEUE_MAX_LEN).context("setting the queue's length")?;
    q.set_nonblocking(true);
    println!("ready");
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        loop {
            match q.recv() {
                Ok(msg) => held.push_back((Instant::now() + delay, msg)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("reading the netfilter queue"),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, mut msg) = held.pop_front().expect("a front element");
            msg.set_verdict(nfq::Verdict::Accept);
            q.verdict(msg).context("letting a packet through")?;
        }
        let next = held.front().map_or(TICK, |(due, _)| due.saturating_duration_since(now).min(TICK));
        std::thread::sleep(next);
    }
}
