//! Prefill/decode disaggregation: a prefill worker computes a prompt and keeps its KV blocks;
//! a decode worker pulls them through NIXL into its own cache and decodes.
//!
//! Dynamo's frontend orchestrates it: a request goes first to a prefill worker (with
//! `max_tokens` 1), whose one terminal chunk carries the `disaggregated_params` of
//! [`Handoff`]; the frontend passes them, untouched, to a decode worker with the request.
//!
//! - **Prefill** ([`DynamoEngine::prefill`]): the engine computes the prompt only, then the KV
//!   connector pins the prompt's cached full blocks (so they are neither evicted nor rewritten)
//!   and the handoff names them: this agent's NIXL metadata, the cache's buffer addresses, the
//!   block ids and the pin's lease. The pin is released when the decode worker's transfer
//!   notification arrives, or after `--kv-hold-ms`.
//! - **Decode** ([`DynamoEngine::import`]): the connector reserves blocks for the prompt's full
//!   blocks that this worker does not cache already; NIXL reads the peer's blocks into them
//!   (one READ of every layer's rows of every block) and notifies the peer; the connector
//!   commits them to the prefix cache under the prompt's chain hashes; the request is then
//!   submitted as usual, finds its prompt cached, and computes only the tail (at least its last
//!   token, whose logits it samples from). Batch invariance makes the output exactly that of a
//!   worker that computed everything itself.
//! - **Failure**: a handoff this worker cannot use (another model or cache layout, unparsable),
//!   a transfer that errs or does not finish within `--kv-transfer-timeout-ms`: the reserved
//!   blocks are not committed and the request computes its prompt itself, with the same output.
//!   A transfer still in flight at the deadline keeps its blocks out of use until NIXL says it
//!   ended, so a late write cannot land in blocks someone else uses.
//!
//! The cache's buffers are registered with NIXL once, at start. Transfers go through NIXL's
//! UCX backend (TCP, shared memory, or RDMA where present; UCX's own `UCX_TLS` and
//! `UCX_NET_DEVICES` choose). Both workers must run the same model with the same cache layout:
//! the handoff carries the per-block bytes of every buffer, and a mismatch falls back.

use std::collections::HashSet;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use base64::Engine as _;
use nixl_sys::{
    Agent, AgentConfig, MemType, MemoryRegion, NixlDescriptor, NotificationMap, OptArgs,
    RegistrationHandle, ThreadSync, XferDescList, XferOp, XferStatus,
};
use serde::{Deserialize, Serialize};
use supernode_engine::engine::connector::{KvOp, KvRegion, LeaseId, Reservation};
use supernode_engine::engine::EngineHandle;

/// The key of supernode's handoff in `disaggregated_params`.
pub const HANDOFF_KEY: &str = "supernode_kv";

/// What a prefill worker tells the decode worker: where the prompt's blocks are.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Handoff {
    /// The model the prefill worker serves (its served name): the decode worker's must be the
    /// same.
    pub model: String,
    /// The prefill worker's NIXL agent and its metadata (base64), which the decode worker
    /// loads to reach it.
    pub agent: String,
    pub metadata: String,
    /// Per cache buffer: its address there and the bytes of one block.
    pub addrs: Vec<usize>,
    pub block_bytes: Vec<usize>,
    /// The prompt's full blocks there, in chain order.
    pub blocks: Vec<u32>,
    /// The pin to release once the blocks are read.
    pub lease: LeaseId,
}

impl Handoff {
    /// The handoff in a decode request's `disaggregated_params`, if there is one.
    pub fn from_params(params: &serde_json::Value) -> Result<Option<Handoff>> {
        match params.get(HANDOFF_KEY) {
            None => Ok(None),
            Some(v) => Ok(Some(serde_json::from_value(v.clone())?)),
        }
    }

    pub fn to_params(&self) -> serde_json::Value {
        serde_json::json!({ HANDOFF_KEY: self })
    }
}

/// The notification a decode worker sends when it is done with a pin.
fn release_message(lease: LeaseId) -> String {
    format!("release:{lease}")
}

/// Counters of the transfers, shown on the worker's metrics.
#[derive(Default)]
pub struct TransferStats {
    /// Requests whose prompt blocks were pulled, and those that fell back to computing them.
    pub pulled: AtomicU64,
    pub fallback: AtomicU64,
    pub blocks: AtomicU64,
    pub bytes: AtomicU64,
    /// Microseconds spent in transfers that succeeded.
    pub micros: AtomicU64,
}

/// One cache buffer, as NIXL registers it.
#[derive(Debug)]
struct Region(KvRegion);

impl MemoryRegion for Region {
    unsafe fn as_ptr(&self) -> *const u8 {
        self.0.addr as *const u8
    }

    fn size(&self) -> usize {
        self.0.len
    }
}

impl NixlDescriptor for Region {
    fn mem_type(&self) -> MemType {
        MemType::Dram
    }

    fn device_id(&self) -> u64 {
        0
    }
}

/// Whether NIXL's C API can be loaded, with what to do when it cannot. (NIXL's own loader
/// aborts the process on the first call if it cannot.)
fn check_library() -> Result<()> {
    let name = CString::new("libnixl_capi.so").expect("no NUL");
    // SAFETY: a NUL-terminated name; the handle is closed again (the loader keeps the library
    // for NIXL's own dlopen of the same name, which follows).
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a NUL-terminated string or null.
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        bail!(
            "prefill/decode workers need NIXL, and libnixl_capi.so cannot be loaded ({why}): \
             install the nixl-cu12==1.3.2 wheel (pip install --no-deps nixl-cu12==1.3.2), put \
             its .nixl_cu12.mesonpy.libs directory on LD_LIBRARY_PATH and set NIXL_PLUGIN_DIR \
             to the plugins directory inside it"
        );
    }
    // SAFETY: a handle dlopen returned.
    unsafe { libc::dlclose(handle) };
    Ok(())
}

/// This worker's NIXL agent with the engine's cache registered.
pub struct KvTransfer {
    /// The agent, until [`KvTransfer::shutdown`]: each use takes a handle of its own, and the
    /// agent (with its progress thread) is destroyed when the last one goes.
    agent: Mutex<Option<Agent>>,
    name: String,
    metadata: String,
    regions: Vec<KvRegion>,
    registered: Mutex<Vec<RegistrationHandle>>,
    /// The thread serving release notifications (prefill workers), and its stop flag.
    notify: Mutex<Option<std::thread::JoinHandle<()>>>,
    notify_stop: Arc<AtomicBool>,
    /// Peers whose metadata is loaded.
    peers: Mutex<HashSet<String>>,
    timeout: Duration,
    pub stats: TransferStats,
}

impl KvTransfer {
    /// An agent with a UCX backend and `regions` registered.
    pub fn new(regions: &[KvRegion], timeout: Duration) -> Result<KvTransfer> {
        check_library()?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("supernode-{}-{nanos:x}", std::process::id());
        // The progress thread, which serves peers' reads of this cache, polls UCX; idle, it
        // waits this long between polls instead of spinning a core the engine needs.
        let cfg = AgentConfig {
            thread_sync: ThreadSync::Strict,
            pthr_delay_us: 500,
            ..AgentConfig::default()
        };
        let agent = Agent::new_configured(&name, &cfg)
            .map_err(|e| anyhow!("cannot create a NIXL agent: {e}"))?;
        let (_, params) = agent.get_plugin_params("UCX").map_err(|e| {
            anyhow!(
                "NIXL has no UCX plugin ({e}): set NIXL_PLUGIN_DIR to the plugins directory of \
                 the nixl-cu12 wheel (.nixl_cu12.mesonpy.libs/plugins)"
            )
        })?;
        agent
            .create_backend("UCX", &params)
            .map_err(|e| anyhow!("NIXL cannot start its UCX backend: {e}"))?;
        let mut registered = Vec::new();
        for r in regions {
            registered.push(
                agent
                    .register_memory(&Region(*r), None)
                    .map_err(|e| anyhow!("NIXL cannot register the KV cache: {e}"))?,
            );
        }
        let md = agent
            .get_local_md()
            .map_err(|e| anyhow!("NIXL gave no agent metadata: {e}"))?;
        Ok(KvTransfer {
            agent: Mutex::new(Some(agent)),
            metadata: base64::engine::general_purpose::STANDARD.encode(md),
            name,
            regions: regions.to_vec(),
            registered: Mutex::new(registered),
            notify: Mutex::new(None),
            notify_stop: Arc::new(AtomicBool::new(false)),
            peers: Mutex::new(HashSet::new()),
            timeout,
            stats: TransferStats::default(),
        })
    }

    /// The handoff naming `blocks` of this worker's cache under pin `lease`.
    pub fn handoff(&self, model: &str, blocks: Vec<u32>, lease: LeaseId) -> Handoff {
        Handoff {
            model: model.to_string(),
            agent: self.name.clone(),
            metadata: self.metadata.clone(),
            addrs: self.regions.iter().map(|r| r.addr).collect(),
            block_bytes: self.regions.iter().map(|r| r.block_bytes).collect(),
            blocks,
            lease,
        }
    }

    /// A handle of the agent, unless it was shut down.
    fn agent(&self) -> Result<Agent, String> {
        self.agent
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| "the worker is shutting down".to_string())
    }

    /// Stops the notification thread, deregisters the cache and lets the agent go (destroyed
    /// once no transfer holds it): before the engine frees the cache, and before the process
    /// exits, whose teardown of NIXL's libraries would otherwise race its threads.
    pub fn shutdown(&self) {
        self.notify_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.notify.lock().unwrap().take() {
            let _ = t.join();
        }
        self.registered.lock().unwrap().clear();
        self.agent.lock().unwrap().take();
    }

    /// Releases the pins decode workers say they are done with, until [`KvTransfer::shutdown`].
    pub fn serve_releases(self: &Arc<Self>, handle: Arc<EngineHandle>) {
        let (me, stop) = (Arc::downgrade(self), self.notify_stop.clone());
        let t = std::thread::Builder::new()
            .name("supernode-kv-notify".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(2));
                    let Some(agent) = me.upgrade().and_then(|t| t.agent().ok()) else {
                        return;
                    };
                    let Ok(mut map) = NotificationMap::new() else {
                        continue;
                    };
                    if agent.get_notifications(&mut map, None).is_err() {
                        continue;
                    }
                    let Ok(notifs) = map.take_notifs() else {
                        continue;
                    };
                    for msg in notifs.values().flatten() {
                        if let Some(lease) = msg
                            .strip_prefix("release:")
                            .and_then(|l| l.parse::<LeaseId>().ok())
                        {
                            handle.kv(KvOp::Release { lease });
                        }
                    }
                }
            })
            .expect("spawning the NIXL notification thread");
        *self.notify.lock().unwrap() = Some(t);
    }

    /// Reads the peer's blocks named by `h` into this worker's blocks `res.fill` (the peer's
    /// blocks from `res.cached` on). `Ok` once they are all here. An error means nothing may
    /// be committed; `Err(true)` means the transfer is still in flight and a thread now owns
    /// the reservation, releasing it once NIXL says the transfer ended.
    pub fn pull(
        self: &Arc<Self>,
        h: &Handoff,
        res: &Reservation,
        handle: &Arc<EngineHandle>,
    ) -> Result<(), (bool, String)> {
        let fail = |m: String| Err((false, m));
        let local: Vec<usize> = self.regions.iter().map(|r| r.block_bytes).collect();
        if h.block_bytes != local || h.addrs.len() != local.len() {
            return fail(format!(
                "the prefill worker's cache layout ({} buffers) is not this worker's ({}): \
                 are both running the same model and precision?",
                h.block_bytes.len(),
                local.len()
            ));
        }
        if h.blocks.len() < res.cached + res.fill.len() {
            return fail("the handoff names fewer blocks than were reserved".into());
        }
        let t0 = Instant::now();
        self.load_peer(h).map_err(|e| (false, e))?;
        let (mut dst, mut src) = match (
            XferDescList::new(MemType::Dram),
            XferDescList::new(MemType::Dram),
        ) {
            (Ok(d), Ok(s)) => (d, s),
            _ => return fail("NIXL cannot make descriptor lists".into()),
        };
        let mut bytes = 0;
        for (r, region) in self.regions.iter().enumerate() {
            let n = region.block_bytes;
            for (j, &to) in res.fill.iter().enumerate() {
                let from = h.blocks[res.cached + j] as usize;
                dst.add_desc(region.addr + to as usize * n, n, 0);
                src.add_desc(h.addrs[r] + from * n, n, 0);
                bytes += n;
            }
        }
        let mut opt = OptArgs::new().map_err(|e| (false, e.to_string()))?;
        let note = release_message(h.lease);
        opt.set_notification_message(note.as_bytes())
            .and_then(|_| opt.set_has_notification(true))
            .map_err(|e| (false, e.to_string()))?;
        let agent = self.agent().map_err(|e| (false, e))?;
        let req = agent
            .create_xfer_req(XferOp::Read, &dst, &src, &h.agent, Some(&opt))
            .map_err(|e| (false, format!("NIXL cannot make the transfer: {e}")))?;
        let mut in_flight = agent
            .post_xfer_req(&req, Some(&opt))
            .map_err(|e| (false, format!("NIXL cannot start the transfer: {e}")))?;
        let deadline = t0 + self.timeout;
        while in_flight {
            match agent.get_xfer_status(&req) {
                Ok(XferStatus::Success) => in_flight = false,
                Ok(XferStatus::InProgress) => {
                    if Instant::now() >= deadline {
                        // The blocks stay reserved until the transfer ends, whichever way.
                        let (handle, lease) = (handle.clone(), res.lease);
                        std::thread::spawn(move || {
                            while let Ok(XferStatus::InProgress) = agent.get_xfer_status(&req) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            drop(req);
                            handle.kv(KvOp::Release { lease });
                        });
                        return Err((
                            true,
                            format!("the transfer did not finish within {:?}", self.timeout),
                        ));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return fail(format!("the transfer failed: {e}")),
            }
        }
        let st = &self.stats;
        st.blocks
            .fetch_add(res.fill.len() as u64, Ordering::Relaxed);
        st.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        st.micros
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Tells the peer to drop its pin without a transfer (one that was not needed or could
    /// not start); best effort, as the peer's `--kv-hold-ms` releases it anyway.
    pub fn release_peer(&self, h: &Handoff) {
        if let (Ok(()), Ok(agent)) = (self.load_peer(h), self.agent()) {
            let _ = agent.send_notification(&h.agent, release_message(h.lease).as_bytes(), None);
        }
    }

    /// Loads the peer's metadata, once per peer.
    fn load_peer(&self, h: &Handoff) -> Result<(), String> {
        if self.peers.lock().unwrap().contains(&h.agent) {
            return Ok(());
        }
        let md = base64::engine::general_purpose::STANDARD
            .decode(&h.metadata)
            .map_err(|e| format!("the peer's metadata is not base64: {e}"))?;
        let name = self
            .agent()?
            .load_remote_md(&md)
            .map_err(|e| format!("NIXL cannot load the peer's metadata: {e}"))?;
        if name != h.agent {
            return Err(format!("the metadata names agent {name}, not {}", h.agent));
        }
        self.peers.lock().unwrap().insert(name);
        Ok(())
    }
}

/// The worker's own metrics in Prometheus' text format: the engine's prompt accounting (to tell
/// computed prompts from imported ones) and, on prefill and decode workers, the transfers.
pub fn metrics_text(handle: &EngineHandle, t: Option<&KvTransfer>) -> String {
    use std::fmt::Write as _;
    let st = handle.stats();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    counter(
        "supernode_prompt_tokens_computed_total",
        "Prompt tokens this worker computed.",
        &[("", load(&st.prompt_tokens_computed))],
    );
    counter(
        "supernode_prefix_cache_hit_tokens_total",
        "Prompt tokens found in the prefix cache (imported blocks included).",
        &[("", load(&st.prefix_hit_tokens))],
    );
    counter(
        "supernode_kv_exported_blocks_total",
        "Blocks pinned for a decode worker to read.",
        &[("", load(&st.kv_exported_blocks))],
    );
    counter(
        "supernode_kv_imported_blocks_total",
        "Blocks read from a prefill worker and committed to the prefix cache.",
        &[("", load(&st.kv_imported_blocks))],
    );
    if let Some(t) = t {
        let s = &t.stats;
        counter(
            "supernode_kv_transfer_requests_total",
            "Decode requests whose prompt blocks were pulled, or computed here instead.",
            &[
                ("{outcome=\"pulled\"}", load(&s.pulled)),
                ("{outcome=\"fallback\"}", load(&s.fallback)),
            ],
        );
        counter(
            "supernode_kv_transfer_blocks_total",
            "Blocks pulled through NIXL.",
            &[("", load(&s.blocks))],
        );
        counter(
            "supernode_kv_transfer_bytes_total",
            "Bytes pulled through NIXL.",
            &[("", load(&s.bytes))],
        );
        counter(
            "supernode_kv_transfer_microseconds_total",
            "Time spent in successful pulls, from the request to the last byte.",
            &[("", load(&s.micros))],
        );
    }
    let _ = writeln!(
        out,
        "# HELP supernode_kv_leases Blocks sets the KV connector holds for transfers.\n\
         # TYPE supernode_kv_leases gauge\nsupernode_kv_leases {}",
        st.kv_leases.load(Ordering::Relaxed)
    );
    out
}

/// A lease of the engine's KV connector, released when dropped.
pub struct LeaseGuard {
    handle: Arc<EngineHandle>,
    lease: Option<LeaseId>,
}

impl LeaseGuard {
    pub fn new(handle: Arc<EngineHandle>, lease: LeaseId) -> LeaseGuard {
        LeaseGuard {
            handle,
            lease: Some(lease),
        }
    }

    /// Someone else releases it now.
    pub fn forget(mut self) {
        self.lease = None;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.handle.kv(KvOp::Release { lease });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoffs_round_trip_through_the_params() {
        let h = Handoff {
            model: "m".into(),
            agent: "a".into(),
            metadata: "bWQ=".into(),
            addrs: vec![4096, 8192],
            block_bytes: vec![64, 64],
            blocks: vec![3, 1, 2],
            lease: 7,
        };
        let p = h.to_params();
        assert_eq!(Handoff::from_params(&p).unwrap(), Some(h));
        assert_eq!(
            Handoff::from_params(&serde_json::json!({"other": 1})).unwrap(),
            None
        );
        assert!(Handoff::from_params(&serde_json::json!({ HANDOFF_KEY: {"agent": 1} })).is_err());
    }
}
