//! [`ChunkStore::open`]: from a manifest location to a serving store, as named steps.

use crate::prelude::*;

impl ChunkStore {
    /// Open (or create) the cache for the image whose manifest is at `manifest`.
    ///
    /// The steps, each a function of this module: [`fetch_runtime`]; the manifest
    /// ([`cached_manifest`] when pinned, else [`fetch_manifest`], with the companions that are
    /// fetched in any case; [`check_pin`]); [`claim_cache_dir`] (create, lock, repair the
    /// manifest copy); [`fetch_companions`] (the blob probe, the prefetch list and the prefetch
    /// pack in one round trip, the pack blob's probe beside them when the pack is known) and
    /// [`check_blob`]; [`choose_pack`] and [`check_pack_blob`]; [`open_presence`] (the data
    /// file and the bitmap: trusted, re-verified or rebuilt); then the shared state and the
    /// persister and maintenance threads ([`ChunkStore::start`]). Background fetching starts
    /// later, when the caller asks ([`ChunkStore::start_default_background`]).
    pub fn open(manifest: &Location, opts: StoreOptions) -> Result<ChunkStore> {
        let t_open = std::time::Instant::now();
        let runtime = fetch_runtime(&opts)?;
        let mut report = OpenReport::default();
        let mut t = std::time::Instant::now();
        // Milliseconds since the last lap.
        let mut lap = || {
            let ms = t.elapsed().as_millis() as u64;
            t = std::time::Instant::now();
            ms
        };
        // One client for the manifest, the prefetch list and the blob: one connection pool.
        let connector = Connector::new(&opts.http, &opts.registry)?;
        report.times.client_ms = t_open.elapsed().as_millis() as u64;
        lap();

        // 1. The manifest. The prefetch list and pack that step 3 would fetch in any case go
        // out with it (their round trip overlaps the manifest's): next to an unpinned
        // manifest, or a pinned one that is not cached yet (the pack when the cache has no
        // copy with its pin).
        let list_loc = manifest.sibling(PREFETCH_FILE);
        let pack_loc = manifest.sibling(PACK_FILE);
        let cached_manifest = cached_manifest(&opts);
        let early_pack = match (opts.expected_pack, opts.expected_id) {
            (None, None) => opts.prefetch_pack,
            // An unpinned pack next to a pinned manifest is not used; next to an unpinned
            // manifest a pinned pack may be cached, in a cache not known yet.
            (None, Some(_)) | (Some(_), None) => false,
            (Some(pin), Some(id)) => {
                let copy = opts.cache_root.join(id.hex()).join(PACK_FILE);
                std::fs::read(copy).ok().map(|b| ImageId::of(&b)) != Some(pin)
            }
        };
        let (bytes, early) = if cached_manifest.is_none() && (opts.use_prefetch_list || early_pack)
        {
            let (b, list, pack) = runtime.block_on(async {
                tokio::join!(
                    fetch_manifest(&connector, manifest),
                    async {
                        match opts.use_prefetch_list {
                            true => Some(connector.read_whole(&list_loc, EARLY_MAX).await),
                            false => None,
                        }
                    },
                    async {
                        match early_pack {
                            true => Some(connector.read_whole(&pack_loc, EARLY_MAX).await),
                            false => None,
                        }
                    }
                )
            });
            let b = check_pin(b.map_err(manifest_error)?, &opts)?;
            (b, Some(Early { list, pack }))
        } else {
            let b = match cached_manifest {
                Some(b) => b,
                None => runtime
                    .block_on(fetch_manifest(&connector, manifest))
                    .map_err(manifest_error)?,
            };
            (check_pin(b, &opts)?, None)
        };
        report.resolved = runtime.block_on(connector.resolved_digest(manifest));
        let id = ImageId::of(&bytes);
        let m = Manifest::decode(&bytes)?;
        report.times.manifest_ms = lap();

        // 2. The cache directory, and the layout it was written with (its own copy of the
        // prefetch pack it used, if any).
        let (dir, lock) = claim_cache_dir(&opts.cache_root, id, &bytes, &mut report)?;
        if let Some(l) = opts.host_cache_limit {
            set_host_limit(&opts.cache_root, (l > 0).then_some(l))?;
        }
        let old = CacheLayout::of(&dir, id, &m);
        report.times.cache_dir_ms = lap();

        // 3. The blob, probed together with the optional companions.
        let blob_loc = manifest.sibling(&m.blob_name);
        let remote = open_blob(&connector, manifest, &m);
        let meta_path = dir.join("meta.json");
        let old_meta: Option<Meta> = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let c = runtime.block_on(fetch_companions(
            &connector,
            &*remote,
            (&m, id),
            &opts,
            (&list_loc, &pack_loc),
            &old,
            early,
        ));
        let etag = check_blob(
            c.probed,
            &*remote,
            &m,
            old_meta.and_then(|m| m.etag),
            &mut report,
        )?;
        let meta = Meta {
            manifest: manifest.to_string(),
            blob: blob_loc.to_string(),
            etag,
        };
        write_atomic(
            &meta_path,
            &serde_json::to_vec_pretty(&meta).expect("meta serializes"),
        )?;
        let prefetch_list = c
            .list
            .and_then(|fetched| load_prefetch(fetched, &list_loc, &dir, &id, m.chunk_count()));

        report.times.probe_ms = lap();

        // 4. The prefetch pack to use, whose frames follow the image's blob.
        let chosen = choose_pack(&opts, &m, id, &pack_loc, c.pack, old.pack.clone())?;
        let chosen = match chosen {
            Some((bytes, p)) => {
                let pack_blob = connector.open_remote(&pack_loc.sibling(&p.blob_name));
                // Probed like the image's blob (not when offline: the cached copy serves),
                // in step 3 already when the pack was known by then.
                let usable = report.offline.is_some() || {
                    let probed = match c.pack_blob {
                        Some((name, probed)) if name == p.blob_name => probed,
                        _ => runtime.block_on(pack_blob.probe()),
                    };
                    check_pack_blob(probed, &*pack_blob, &p, &opts)?
                };
                usable.then_some((bytes, p, pack_blob))
            }
            None => None,
        };
        report.times.pack_probe_ms = lap();
        let pack_id = chosen.as_ref().map(|(b, _, _)| ImageId::of(b));
        report.prefetch_pack = pack_id.map(|p| p.to_string());
        let pack_bytes = chosen.as_ref().map(|(b, _, _)| b.clone());
        // From here on `m` is the manifest as the store uses it: with the prefetch pack in
        // place of the metadata pack, its frames read through the concatenated remote.
        let (remote, m) = match chosen {
            Some((_, p, pack_blob)) => (
                Box::new(Concat::new(remote, m.blob_size, pack_blob, p.blob_size))
                    as Box<dyn Remote>,
                p.apply(&m)?,
            ),
            None => (remote, m),
        };

        // 5. Data file and bitmap; repair rather than trust.
        let pack_changed = old.pack != pack_bytes;
        let bitmap_id = cache_bitmap_id(id, pack_id);
        let mut p = open_presence(&dir, &old, &m, bitmap_id, pack_changed, &mut report)?;
        // Another prefetch pack than the cache was written with (or none, or a first one):
        // keep a copy of the pack that decides the bitmap's layout (`open_presence` carried
        // the bits over). A crash in between leaves a bitmap whose id does not match the pack
        // copy: the next open discards the cache, it never misreads it.
        if pack_changed {
            let copy = dir.join(PACK_FILE);
            match &pack_bytes {
                Some(b) => write_atomic(&copy, b)?,
                None => std::fs::remove_file(&copy).map_err(|e| Error::io(&copy, e))?,
            }
        }

        report.times.presence_ms = lap();

        // 6. The running store.
        let bitmap = p.bitmap.take().expect("open_presence returns the bitmap");
        let inner = Inner::new(
            id,
            m,
            dir,
            p,
            remote,
            opts,
            runtime.handle(),
            prefetch_list,
            bitmap,
        )?;
        report.times.start_ms = lap();
        ChunkStore::start(inner, report, runtime, bytes, lock)
    }

    /// The running store of state `inner`: its eviction thread when it has a cache limit.
    /// Presence bits are persisted by rounds on the runtime's blocking pool, started when there
    /// is something to persist ([`crate::persist`]), so an idle store holds no thread but its
    /// runtime's worker.
    fn start(
        inner: Inner,
        report: OpenReport,
        runtime: tokio::runtime::Runtime,
        manifest_bytes: Vec<u8>,
        lock: File,
    ) -> Result<ChunkStore> {
        let inner = Arc::new(inner);
        let _ = inner.persist.owner.set(Arc::downgrade(&inner));
        let bitmap = inner.bitmap.clone();
        // In the background: attach is not slowed by reading the other caches' manifests.
        inner.start_index_build();
        inner.start_host_rounds();
        let maintenance = match inner.opts.cache_limit {
            None => None,
            Some(_) => {
                let inner = inner.clone();
                let bitmap = bitmap.clone();
                let h = std::thread::Builder::new()
                    .name("lazyblk-evict".into())
                    .spawn(move || maintenance(&inner, &bitmap))
                    .map_err(|e| Error::io("eviction thread", e))?;
                Some(h)
            }
        };
        Ok(ChunkStore {
            inner,
            report,
            bitmap,
            maintenance,
            runtime: Some(runtime),
            manifest_bytes,
            _lock: lock,
        })
    }
}

/// How long an idle blocking-pool thread of a store's runtime lives (tokio's default is 10 s).
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// The runtime of a store's fetches: `fetch_threads` async workers and a bounded blocking pool
/// for verification and persist rounds, whose threads exit after a short idle time (a host runs
/// a store per device: idle devices should not hold threads).
fn fetch_runtime(opts: &StoreOptions) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.fetch_threads.max(1))
        // Verifying and writing chunks (zstd + BLAKE3 + pwrite) runs on the blocking pool:
        // CPU-bound, so no more threads than a few per core (tokio's default is 512).
        .max_blocking_threads(verify_threads())
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .thread_name("lazyblk-fetch")
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))
}

/// Step 1: the cached manifest, when its digest is pinned and the cache has it (no round trip
/// then).
fn cached_manifest(opts: &StoreOptions) -> Option<Vec<u8>> {
    let id = opts.expected_id?;
    let p = opts.cache_root.join(id.hex()).join("manifest");
    std::fs::read(p).ok().filter(|b| ImageId::of(b) == id)
}

/// The manifest `bytes`, if they are the ones `opts.expected_id` pins (or nothing is pinned).
fn check_pin(bytes: Vec<u8>, opts: &StoreOptions) -> Result<Vec<u8>> {
    let id = ImageId::of(&bytes);
    if let Some(want) = opts.expected_id {
        if want != id {
            return Err(Error::ManifestDigest {
                expected: want.to_string(),
                actual: id.to_string(),
            });
        }
    }
    Ok(bytes)
}

/// A manifest that could not be read, said so.
fn manifest_error(e: Error) -> Error {
    match e {
        Error::Remote(r) => Error::Remote(RemoteError {
            message: format!("cannot read the manifest: {}", r.message),
            ..r
        }),
        other => other,
    }
}

/// The largest prefetch list or pack fetched together with the manifest, before its real limit
/// is known (from the manifest: [`list_limit`], [`pack_limit`]); a bigger one is fetched again
/// in step 3 when its own limit allows it.
const EARLY_MAX: u64 = 64 << 20;

/// The prefetch list and pack fetched together with the manifest (step 1), when fetched.
pub(crate) struct Early {
    list: Option<std::result::Result<Vec<u8>, RemoteError>>,
    pack: Option<std::result::Result<Vec<u8>, RemoteError>>,
}

/// The largest prefetch list of image `m`.
fn list_limit(m: &Manifest) -> u64 {
    4 * m.chunk_count() + 64
}

/// The largest prefetch pack file of image `m`.
fn pack_limit(m: &Manifest) -> u64 {
    40 * m.block_count() + 4096
}

/// An early fetch of `loc` held to its real `limit`: `None` when it must be fetched again (it
/// was cut at [`EARLY_MAX`] while the real limit is larger).
fn held_to(
    got: std::result::Result<Vec<u8>, RemoteError>,
    loc: &Location,
    limit: u64,
) -> Option<std::result::Result<Vec<u8>, RemoteError>> {
    match got {
        Ok(b) if b.len() as u64 > limit => Some(Err(RemoteError::permanent(
            loc.to_string(),
            format!("larger than {limit} bytes"),
        ))),
        Err(_) if limit > EARLY_MAX => None,
        other => Some(other),
    }
}

/// Step 2: the cache directory of image `id` under `root`, created if need be and locked
/// (one process per cache), with a copy of the manifest `bytes` that is this image's.
pub(crate) fn claim_cache_dir(
    root: &Path,
    id: ImageId,
    bytes: &[u8],
    report: &mut OpenReport,
) -> Result<(PathBuf, File)> {
    let dir = root.join(id.hex());
    report.fresh = !dir.join("manifest").exists();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let lock = lock_dir_waiting(&dir, Duration::from_secs(2))?;
    // The cached copy must be this image's manifest (a directory copied from another image
    // is repaired here; its bitmap and data are rejected later by the image id).
    let cached_ok = std::fs::read(dir.join("manifest")).is_ok_and(|b| b == bytes);
    if !cached_ok {
        if !report.fresh {
            tracing::warn!(
                "{}: the cached manifest was not this image's; rewritten",
                dir.display()
            );
        }
        write_atomic(&dir.join("manifest"), bytes)?;
    }
    Ok((dir, lock))
}

/// What step 3 fetched in one round trip: the blob probe and the optional companions (`None`:
/// not asked for).
pub(crate) struct Companions {
    pub(crate) probed: std::result::Result<BlobInfo, RemoteError>,
    pub(crate) list: Option<std::result::Result<Vec<u8>, RemoteError>>,
    pub(crate) pack: Option<std::result::Result<Vec<u8>, RemoteError>>,
    /// The probe of the blob of the prefetch pack step 4 will likely choose (the one fetched,
    /// else the cache's copy), with its blob name: when it was known in time.
    pub(crate) pack_blob: Option<(String, std::result::Result<BlobInfo, RemoteError>)>,
}

/// Step 3: probe the blob and fetch the prefetch list and the prefetch pack at the same time
/// (one round trip, not three), and probe the prefetch pack's blob as soon as the pack is
/// known (fetched with the manifest, or cached: then in the same round trip too).
async fn fetch_companions(
    connector: &Connector,
    remote: &dyn Remote,
    (m, id): (&Manifest, ImageId),
    opts: &StoreOptions,
    (list_loc, pack_loc): (&Location, &Location),
    old: &CacheLayout,
    early: Option<Early>,
) -> Companions {
    let (early_list, early_pack) = match early {
        Some(e) => (
            e.list.and_then(|r| held_to(r, list_loc, list_limit(m))),
            e.pack.and_then(|r| held_to(r, pack_loc, pack_limit(m))),
        ),
        None => (None, None),
    };
    // The prefetch pack: pinned (and not already cached), or next to an unpinned manifest
    // when prefetching is on (without it, a copy the cache kept stays in use).
    let fetch_pack = match opts.expected_pack {
        Some(pin) => old.pack.as_deref().map(ImageId::of) != Some(pin),
        None => opts.prefetch_pack && opts.expected_id.is_none(),
    };
    let probe = async {
        // An image of zeros has an empty blob: nothing will ever be fetched, and a range
        // probe of an empty file cannot succeed (servers answer 416), so do not probe.
        if m.blob_size == 0 {
            Ok(BlobInfo::default())
        } else {
            remote.probe().await
        }
    };
    let list = async {
        if early_list.is_some() {
            early_list
        } else if opts.use_prefetch_list {
            Some(connector.read_whole(list_loc, list_limit(m)).await)
        } else {
            None
        }
    };
    let pack = async {
        let fetched = if early_pack.is_some() {
            early_pack
        } else if fetch_pack {
            Some(connector.read_whole(pack_loc, pack_limit(m)).await)
        } else {
            None
        };
        // The pack step 4 will likely use (it decides; a probe of another is not used).
        let usable = |b: &[u8]| accept_pack(opts, m, id, b).ok();
        let candidate = match &fetched {
            Some(Ok(b)) => usable(b),
            _ => None,
        }
        .or_else(|| old.pack.as_deref().and_then(usable));
        let pack_blob = match candidate {
            Some(p) => {
                let blob = connector.open_remote(&pack_loc.sibling(&p.blob_name));
                Some((p.blob_name, blob.probe().await))
            }
            None => None,
        };
        (fetched, pack_blob)
    };
    let (probed, list, (pack, pack_blob)) = tokio::join!(probe, list, pack);
    Companions {
        probed,
        list,
        pack,
        pack_blob,
    }
}

/// Step 3, checked: the blob must have the manifest's size; returns the ETag to keep. A blob
/// that cannot be reached is fine for a cache that exists (it serves what it has, offline).
fn check_blob(
    probed: std::result::Result<BlobInfo, RemoteError>,
    remote: &dyn Remote,
    m: &Manifest,
    mut etag: Option<String>,
    report: &mut OpenReport,
) -> Result<Option<String>> {
    match probed {
        Ok(info) => {
            if info.size != m.blob_size {
                return Err(Error::BlobMismatch {
                    location: remote.location(),
                    detail: format!(
                        "size is {} bytes, the manifest says {}",
                        info.size, m.blob_size
                    ),
                });
            }
            if let (Some(old), Some(new)) = (&etag, &info.etag) {
                if old != new {
                    tracing::warn!(
                        "blob {} has a new ETag ({old} -> {new}); chunks are still verified by digest",
                        remote.location()
                    );
                }
            }
            etag = info.etag;
        }
        Err(e) if e.is_transient() && !report.fresh => {
            tracing::warn!("remote unreachable at open, serving from cache until it returns: {e}");
            report.offline = Some(e.to_string());
        }
        Err(e) => return Err(e.into()),
    }
    Ok(etag)
}

/// Step 4, checked: whether the blob of the chosen prefetch pack `p` is there with the size
/// the pack gives (`probed`). A pinned pack whose blob is wrong is an error; an unpinned one
/// is skipped.
fn check_pack_blob(
    probed: std::result::Result<BlobInfo, RemoteError>,
    pack_blob: &dyn Remote,
    p: &PrefetchPack,
    opts: &StoreOptions,
) -> Result<bool> {
    let why = match probed {
        Ok(info) if info.size == p.blob_size => None,
        Ok(info) => Some(format!(
            "{}: size is {} bytes, the pack says {}",
            pack_blob.location(),
            info.size,
            p.blob_size
        )),
        Err(e) if e.is_transient() => None,
        Err(e) => Some(e.to_string()),
    };
    match why {
        None => Ok(true),
        Some(why) if opts.expected_pack.is_some() => {
            Err(Error::Invalid(format!("prefetch pack blob {why}")))
        }
        Some(why) => {
            tracing::warn!("not using the prefetch pack: its blob {why}");
            Ok(false)
        }
    }
}

/// What step 5 found or made: the data file, the bitmap and the presence it records.
pub(crate) struct Presence {
    pub(crate) data_path: PathBuf,
    pub(crate) data: File,
    pub(crate) device_size: u64,
    /// Taken by the opener when the store starts.
    pub(crate) bitmap: Option<BitmapFile>,
    pub(crate) present: AtomicBits,
    /// Bytes of present non-zero chunks.
    pub(crate) cached: u64,
}

/// Step 5: the data file and the bitmap of the cache in `dir` for the manifest `m` as the store
/// uses it (bound to `bitmap_id`), given the `old` layout the cache was written with. A bitmap
/// that was closed cleanly is trusted; a dirty one has every unit it claims re-verified; one
/// of the wrong size or image, or a data file of the wrong size, is discarded and the cache
/// rebuilt. With `pack_changed` (another prefetch pack than the cache was written with, or
/// none, or a first one) the bits are carried over to the new layout.
pub(crate) fn open_presence(
    dir: &Path,
    old: &CacheLayout,
    m: &Manifest,
    bitmap_id: ImageId,
    pack_changed: bool,
    report: &mut OpenReport,
) -> Result<Presence> {
    let device_size = m.image_size.div_ceil(u64::from(BLOCK_SIZE)) * u64::from(BLOCK_SIZE);
    let data_path = dir.join("data");
    let data = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&data_path)
        .map_err(|e| Error::io(&data_path, e))?;
    let data_len = data.metadata().map_err(|e| Error::io(&data_path, e))?.len();
    let bitmap_path = dir.join("bitmap");
    let n = m.chunk_count();
    // The bitmap holds a bit per unit: chunks, then the metadata pack's frames.
    let units = m.unit_count();
    let opened = if report.fresh || !bitmap_path.exists() {
        None
    } else if data_len != device_size {
        report.discarded = Some(format!(
            "data file is {data_len} bytes, expected {device_size}"
        ));
        None
    } else {
        match BitmapFile::open(&bitmap_path, old.bitmap_id, old.manifest.unit_count()) {
            Ok(x) => Some(x),
            Err(e) => {
                report.discarded = Some(e.to_string());
                None
            }
        }
    };
    if let Some(why) = &report.discarded {
        tracing::warn!("discarding the cache in {}: {why}", dir.display());
    }
    let mut created = false;
    let mut bitmap = match opened {
        Some((b, Trust::Clean)) => b,
        Some((mut b, Trust::Verify)) => {
            let (bits, checked, bad) = reverify(&old.manifest, &data, b.bits());
            report.reverified = checked;
            report.dropped = bad;
            if bad > 0 {
                tracing::warn!("{bad} of {checked} cached chunks and pack frames failed re-verification; they will be fetched again");
            }
            b.replace(bits)?;
            b
        }
        None => {
            created = true;
            data.set_len(0)
                .and_then(|_| data.set_len(device_size))
                .map_err(|e| Error::io(&data_path, e))?;
            BitmapFile::create(&bitmap_path, bitmap_id, units)?
        }
    };
    // The caller then keeps a copy of the pack that decides the new layout.
    if pack_changed && !created {
        let bits = carry_bits(&old.manifest, bitmap.bits(), m);
        bitmap = BitmapFile::create(&bitmap_path, bitmap_id, units)?;
        bitmap.replace(bits)?;
    }
    if data_len != device_size && report.discarded.is_none() {
        data.set_len(device_size)
            .map_err(|e| Error::io(&data_path, e))?;
    }
    let present = AtomicBits::new(units);
    for i in 0..units {
        if bitmap.bits()[i as usize] || (i < n && m.chunk(i) == ChunkRef::Zero) {
            present.set(i);
        }
    }
    // Zero chunks are holes in the sparse file; record them so the bitmap tells the truth.
    let zeros: Vec<u64> = (0..n)
        .filter(|&i| m.chunk(i) == ChunkRef::Zero && !bitmap.bits()[i as usize])
        .collect();
    bitmap.update(&zeros, &[])?;
    let cached: u64 = (0..n)
        .filter(|&i| present.get(i) && m.chunk(i) != ChunkRef::Zero)
        .map(|i| u64::from(m.chunk_len(i)))
        .sum();
    Ok(Presence {
        data_path,
        data,
        device_size,
        bitmap: Some(bitmap),
        present,
        cached,
    })
}

pub(crate) async fn fetch_manifest(connector: &Connector, loc: &Location) -> Result<Vec<u8>> {
    let mut attempt = 0;
    loop {
        match connector.read_whole(loc, MAX_MANIFEST_BYTES).await {
            Ok(b) => return Ok(b),
            Err(e) if e.is_transient() && attempt < 3 => {
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The prefetch pack to use, as raw bytes and decoded: the one `fetched` from `loc`, else the
/// cache's copy, if it belongs to this image and is trusted (it has the digest
/// `opts.expected_pack` asks for; without one, only next to an unpinned manifest). A pinned
/// pack that is neither there nor cached is an error; an unpinned one that is not usable is
/// skipped with a warning (it only makes reads faster).
pub(crate) fn choose_pack(
    opts: &StoreOptions,
    m: &Manifest,
    id: ImageId,
    loc: &Location,
    fetched: Option<std::result::Result<Vec<u8>, RemoteError>>,
    cached: Option<Vec<u8>>,
) -> Result<Option<(Vec<u8>, PrefetchPack)>> {
    let accept = |b: &[u8]| accept_pack(opts, m, id, b);
    let mut why = None;
    match fetched {
        Some(Ok(b)) => match accept(&b) {
            Ok(p) => return Ok(Some((b, p))),
            Err(e) => why = Some(e),
        },
        Some(Err(e)) if e.kind == ErrorKind::Permanent && opts.expected_pack.is_none() => {
            tracing::debug!("no prefetch pack at {loc}: {e}");
        }
        Some(Err(e)) => why = Some(e.to_string()),
        None => {}
    }
    // Fall back to the cache's copy when nothing usable was fetched (offline, unpublished,
    // or a new pack that is not acceptable).
    if let Some(b) = cached {
        if let Ok(p) = accept(&b) {
            if let Some(w) = &why {
                tracing::warn!("prefetch pack at {loc}: {w}; using the cached copy");
            }
            return Ok(Some((b, p)));
        }
    }
    match (why, opts.expected_pack) {
        (Some(w), Some(_)) => Err(Error::Invalid(format!("prefetch pack {loc}: {w}"))),
        (None, Some(_)) => Err(Error::Invalid(format!(
            "prefetch pack {loc}: not fetched and not in the cache"
        ))),
        (Some(w), None) => {
            tracing::warn!("ignoring the prefetch pack at {loc}: {w}");
            Ok(None)
        }
        (None, None) => Ok(None),
    }
}

/// The prefetch pack file `b`, if it is one a store of image `id` (manifest `m`) may use: it
/// decodes for this image, fits its metadata pack, and is trusted (it has the digest
/// `opts.expected_pack` asks for; without one, only next to an unpinned manifest). Else why not.
fn accept_pack(
    opts: &StoreOptions,
    m: &Manifest,
    id: ImageId,
    b: &[u8],
) -> std::result::Result<PrefetchPack, String> {
    let p = PrefetchPack::decode(b, &id, m.image_size).map_err(|e| e.to_string())?;
    // An extending pack must fit the metadata pack (checked here: `apply` then holds).
    p.apply(m).map_err(|e| e.to_string())?;
    match opts.expected_pack {
        Some(pin) if ImageId::of(b) != pin => Err(format!(
            "its digest is {}, --pack-digest asks for {pin}",
            ImageId::of(b)
        )),
        None if opts.expected_id.is_some() => {
            Err("the manifest is pinned and the pack is not (give its digest)".into())
        }
        _ => Ok(p),
    }
}

/// The optional prefetch list next to the manifest, as `fetched` from `loc` (falling back to
/// the cached copy when it could not be fetched).
pub(crate) fn load_prefetch(
    fetched: std::result::Result<Vec<u8>, RemoteError>,
    loc: &Location,
    dir: &Path,
    id: &ImageId,
    chunk_count: u64,
) -> Option<Vec<u32>> {
    let cached = dir.join(PREFETCH_FILE);
    let bytes = match fetched {
        Ok(b) => {
            let _ = write_atomic(&cached, &b);
            b
        }
        Err(e) => {
            tracing::debug!("no prefetch list at {loc}: {e}");
            std::fs::read(&cached).ok()?
        }
    };
    match PrefetchList::decode(&bytes, id, chunk_count) {
        Ok(p) => {
            tracing::info!("prefetch list: {} chunks", p.chunks.len());
            Some(p.chunks)
        }
        Err(e) => {
            tracing::warn!("ignoring the prefetch list at {loc}: {e}");
            None
        }
    }
}

/// The image's stored blob: its own blob, or (a converted image with layers as shared blobs)
/// the shared blobs and then the own blob, read as one.
fn open_blob(connector: &Connector, manifest: &Location, m: &Manifest) -> Box<dyn Remote> {
    let own = connector.open_remote(&manifest.sibling(&m.blob_name));
    if m.shared.is_empty() {
        return own;
    }
    let mut parts: Vec<(Box<dyn Remote>, u64)> = m
        .shared
        .iter()
        .map(|b| (connector.open_remote(&manifest.sibling(&b.name)), b.size))
        .collect();
    parts.push((own, m.own_blob_size()));
    Box::new(Concat::of(parts))
}
