//! `warren image ...`: import, push, pull, mount, list, inspect, remove, collect and export
//! images. Local images live in `<data>/images` (an OCI layout); the host chunk cache in
//! `<data>/cache`. A reference whose first part is a host (`127.0.0.1:5000/team/dev:1`) names an
//! image in a registry; anything else (`dev:1`) a local one.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use warren_agent::ImageUnavailable;
use warren_builder::BuildError;
use warren_envfile::ByteSize;
use warren_image::{ChunkParams, Digest, ImageBuilder, Limits, TreeIndex, import_dir, import_tar};
use warren_lazyfs::{pull, trace};
use warren_runtime::image_mount::MountSignal;
use warren_runtime::image_sharing::WholeLease;
use warren_store::images::{commit, copy_image, open_image};
use warren_store::manifest::ImageConfig;
use warren_store::{
    BlobStore, ChunkCache, ChunkFetcher, LocalStore, RegistryRef, RegistryStore, Retry, StoreError,
};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a directory, a tar stream (`-` for stdin; plain, gzip or zstd), an OCI layout
    /// (`oci:DIR[:TAG]`) or a registry image (`docker://HOST/REPO:TAG`) as NAME:TAG
    Import {
        source: String,
        name: String,
        /// Reuse the chunks of only this local image (by default: of every local image)
        #[arg(long)]
        base: Option<String>,
    },
    /// Build a Debian base image with mmdebstrap from a Debian mirror (for machines that cannot
    /// reach a public registry): `debian:bookworm`, `debian:trixie`, ...
    Bootstrap(BootstrapArgs),
    /// Copy a local image to a registry (only the blobs the registry lacks)
    Push { name: String, destination: String },
    /// Copy a registry image, all of it, into the local store
    Pull {
        source: String,
        name: Option<String>,
    },
    /// Mount an image read-only, fetching file data on first read; runs until SIGTERM or Ctrl-C
    Mount {
        image: String,
        mountpoint: PathBuf,
        /// Record which chunks are read during the first SECONDS (or until SIGUSR1) and store
        /// the trace with the image, to be prefetched on later cold mounts
        #[arg(long, value_name = "SECONDS")]
        record_trace: Option<u64>,
        /// Do not replay the image's stored trace
        #[arg(long)]
        no_prefetch: bool,
        /// Do not pull the rest of the image in the background
        #[arg(long)]
        no_background: bool,
        /// Write the mount's counters as JSON to FILE every half second
        #[arg(long, value_name = "FILE")]
        stats: Option<PathBuf>,
        /// Cap the host chunk cache, e.g. 20GiB (chunks of mounted images are never evicted)
        #[arg(long)]
        cache_limit: Option<String>,
        /// Add N to every uid and gid (for a user namespace starting at N)
        #[arg(long, default_value_t = 0)]
        id_offset: u32,
        /// Say on this open fd, as one JSON line, when the tree is served or why it will not be
        /// (for whoever starts the mount; warren's own shim passes 3)
        #[arg(long, value_name = "FD")]
        ready_fd: Option<i32>,
        /// Serve every workspace holding FILE (a shared flock): setuid bits are ignored here
        /// (each workspace's idmapped view honors them); ends when nobody has held it for 10 s
        #[arg(long, value_name = "FILE", hide = true, conflicts_with_all = ["record_trace", "id_offset"])]
        shared_lease: Option<PathBuf>,
        /// Refuse to serve unless IMAGE is this manifest digest (sha256:...)
        #[arg(long, hide = true)]
        digest: Option<String>,
        /// Read every file through the mount, never from a whole-file copy (FUSE
        /// passthrough, which costs overlays on the tree one of the kernel's two stacking levels)
        #[arg(long, env = "WARREN_NO_PASSTHROUGH")]
        no_passthrough: bool,
    },
    /// Find or start the host's one mount of an image, shared by its workspaces, and say
    /// where it is on --ready-fd (run by a workspace's supervisor)
    #[command(hide = true)]
    Share {
        image: String,
        /// The host's folder of shared mounts
        #[arg(long)]
        under: PathBuf,
        /// Whose workspace it is for: a mount is shared only between one tenant's workspaces
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long, value_name = "FD")]
        ready_fd: Option<i32>,
        /// Serve it with `image mount --no-passthrough`
        #[arg(long)]
        no_passthrough: bool,
    },
    /// List local images
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show an image's manifest, configuration and size
    Inspect {
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a local image's tag (its blobs go at the next `gc`)
    Rm { name: String },
    /// Delete local blobs no image refers to
    Gc,
    /// Write an image as a standard OCI image into an OCI layout (`oci:DIR:TAG`)
    Export { image: String, destination: String },
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// `debian:SUITE` (also the image's name, unless --tag)
    image: String,
    /// The mirror to build from
    #[arg(
        long,
        env = "WARREN_DEBIAN_MIRROR",
        default_value = "http://deb.debian.org/debian"
    )]
    mirror: String,
    /// A keyring the mirror is signed with (a mirror of your own, signed with your key), kept
    /// in the image's apt keyrings; Debian's keys are trusted without it
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// mmdebstrap's variant: minbase, buildd, standard, ...
    #[arg(long, default_value = "minbase")]
    variant: String,
    /// More packages (repeat, or separate with commas)
    #[arg(long, value_delimiter = ',')]
    include: Vec<String>,
    /// Store it under this NAME:TAG instead
    #[arg(long)]
    tag: Option<String>,
}

fn local_store(data: &Path) -> anyhow::Result<LocalStore> {
    Ok(LocalStore::open(&data.join("images"))?)
}

/// Where registry credentials are kept: `WARREN_REGISTRY_AUTH`, else
/// `<data>/registry-auth.json`.
fn auth_file(data: &Path) -> PathBuf {
    std::env::var_os("WARREN_REGISTRY_AUTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| data.join("registry-auth.json"))
}

/// The credentials for registry `host` from the auth file (Docker's `config.json` form:
/// `{"auths": {"HOST": {"auth": base64("user:password")}}}`, or `username` and `password`).
/// Only that host's entry is ever used, so a registry a user names gets no other registry's
/// password. A file others may read is not used.
fn credentials(data: &Path, host: &str) -> anyhow::Result<Option<(String, String)>> {
    let path = auth_file(data);
    let Some(text) = crate::client::read_private(&path, "registry passwords")? else {
        return Ok(None);
    };
    let parsed: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let Some(entry) = parsed["auths"].get(host) else {
        return Ok(None);
    };
    if let Some(auth) = entry["auth"].as_str() {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .with_context(|| format!("{}: `auth` of {host} is not base64", path.display()))?;
        let (user, password) = decoded.split_once(':').with_context(|| {
            format!("{}: `auth` of {host} is not user:password", path.display())
        })?;
        return Ok(Some((user.to_owned(), password.to_owned())));
    }
    match (entry["username"].as_str(), entry["password"].as_str()) {
        (Some(user), Some(password)) => Ok(Some((user.to_owned(), password.to_owned()))),
        _ => bail!(
            "{}: the entry of {host} has neither `auth` nor `username` and `password`",
            path.display()
        ),
    }
}

/// Copies local image `name` to `destination` (`HOST/REPO:TAG`), only the blobs the registry
/// lacks, and its startup trace with it, so a cold mount from the registry replays it.
pub fn push(
    data: &Path,
    name: &str,
    destination: &str,
    progress: impl FnMut(u64, u64),
) -> anyhow::Result<Digest> {
    check_local_name(name)?;
    let r = RegistryRef::parse(destination)?;
    let local = local_store(data)?;
    let remote = registry(data, &r)?;
    let digest = copy_image(&local, &remote, name, &r.reference, progress)?;
    if let Some(recorded) = trace::load(&local, &digest)? {
        trace::save(&remote, &digest, &recorded)?;
    }
    Ok(digest)
}

/// Saves a workspace's writable layer over its image as the registry image `destination`: the
/// merged tree's index and packs of the chunks it wrote. The image's own blobs are copied into
/// the destination's repository first where it lacks them (none when the image is there
/// already, as a prebuild pushed to the same repository is). A `running` workspace is frozen
/// while its layer is read, and thawed before anything is pushed.
pub fn save_layer(
    data: &Path,
    layer: &warren_runtime::WritableLayer,
    destination: &str,
    running: Option<(&dyn warren_runtime::Runtime, &warren_runtime::WorkspaceId)>,
) -> anyhow::Result<Digest> {
    let dest = RegistryRef::parse(destination)?;
    let target = registry(data, &dest)?;
    let (base_store, base_name) = resolve(data, &layer.image, Retry::patient())?;
    let parent = open_image(base_store.as_ref(), &base_name)
        .with_context(|| format!("the workspace's image {}", layer.image))?;
    // The image the layer lies over, whole, in the destination's repository (a tag keeps it
    // there for as long as layers need it).
    copy_image(
        base_store.as_ref(),
        &target,
        &base_name,
        &format!("base-{}", &parent.digest.hex()[..16]),
        |_, _| {},
    )?;
    // Only the parent's chunks are reused: every pack the result names is then in the
    // destination's repository.
    let work = tempfile_dir(data)?;
    let mut builder = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
    builder.start_from(&parent.index);
    // Read frozen when it runs (the chunks are made here meanwhile); pushed once thawed.
    let built = {
        let frozen = running
            .map(|(runtime, id)| warren_runtime::Frozen::hold(runtime, id))
            .transpose()
            .context("cannot freeze the workspace to read its layer")?;
        let started = Instant::now();
        warren_image::apply_overlay_upper(&mut builder, &layer.upper, layer.id_offset)?;
        let built = builder.finish()?;
        if let Some(frozen) = frozen {
            drop(frozen);
            tracing::info!(
                destination,
                frozen_ms = started.elapsed().as_millis() as u64,
                "read a running workspace's layer while it was frozen"
            );
        }
        built
    };
    let digest = commit(&target, &built, parent.config.clone(), &dest.reference)?;
    // The image's startup trace names chunks the layer shares with it: a cold start of the
    // layer elsewhere replays it.
    if let Ok(Some(recorded)) = trace::load(base_store.as_ref(), &parent.digest) {
        trace::save(&target, &digest, &recorded)?;
    }
    Ok(digest)
}

/// [`save_layer`] for the agent.
pub fn layer_saver(data: &Path) -> warren_agent::LayerSaver {
    let data = data.to_path_buf();
    Arc::new(move |layer, destination, running| {
        save_layer(&data, layer, destination, running)
            .map(drop)
            .map_err(|e| format!("cannot save the layer to {destination}: {e:#}"))
    })
}

fn registry(data: &Path, r: &RegistryRef) -> anyhow::Result<RegistryStore> {
    let insecure = std::env::var("WARREN_REGISTRY_INSECURE").is_ok_and(|v| v == "1");
    Ok(RegistryStore::new(
        &r.host,
        &r.repository,
        credentials(data, &r.host)?,
        insecure,
    ))
}

/// The store holding `reference` and the name of the image inside it; registry reads retry as
/// `retry` says.
fn resolve(
    data: &Path,
    reference: &str,
    retry: Retry,
) -> anyhow::Result<(Arc<dyn BlobStore>, String)> {
    // A registry image a build brought in is read from here.
    if let Ok(r) = RegistryRef::parse(reference)
        && !local_store(data)?.tags()?.contains_key(reference)
    {
        return Ok((
            Arc::new(registry(data, &r)?.with_retry(retry)),
            r.reference.clone(),
        ));
    }
    check_local_name(reference)?;
    Ok((Arc::new(local_store(data)?), reference.to_owned()))
}

/// Whether workspaces of this host can be made from `reference`: it is in the local store, or
/// its registry answers for its manifest within seconds. The error names what is missing.
pub fn image_check(data: &Path) -> warren_agent::ImageCheck {
    let data = data.to_path_buf();
    Arc::new(move |reference: &str| check_image(&data, reference))
}

fn check_image(data: &Path, reference: &str) -> Result<(), ImageUnavailable> {
    use warren_runtime::image_mount::printable;
    let host = |e: &dyn std::fmt::Display| ImageUnavailable::Host(printable(&format!("{e:#}")));
    let local = local_store(data).map_err(|e| host(&e))?;
    if local.tags().map_err(|e| host(&e))?.contains_key(reference) {
        return Ok(());
    }
    let not_found = |why: String| ImageUnavailable::NotFound(printable(&why));
    let registry_says = |why: String| ImageUnavailable::Registry(printable(&why));
    let Ok(r) = RegistryRef::parse(reference) else {
        return Err(not_found(format!(
            "image {reference} not found (`warren image ls` lists this host's images)"
        )));
    };
    let remote = registry(data, &r)
        .map_err(|e| host(&e))?
        .with_retry(Retry {
            attempts: 2,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(1),
        })
        .with_request_limit(Duration::from_secs(8));
    match remote.get_manifest(&r.reference) {
        Ok(_) => Ok(()),
        Err(StoreError::ManifestNotFound { .. }) => Err(not_found(format!(
            "image {reference} not found: registry {} has no {}:{}",
            r.host, r.repository, r.reference
        ))),
        Err(e) if e.is_connection_refused() => Err(registry_says(format!(
            "image {reference}: registry {} refused the connection",
            r.host
        ))),
        // What the registry said stays in the host's log: the user learns its answer's status.
        Err(StoreError::Http { status, .. }) => Err(registry_says(format!(
            "image {reference}: registry {} answered HTTP {status}",
            r.host
        ))),
        Err(StoreError::Auth { .. }) => Err(registry_says(format!(
            "image {reference}: registry {} refused this host's credentials",
            r.host
        ))),
        Err(e) => {
            tracing::warn!(image = reference, error = %e, "cannot resolve an image");
            Err(registry_says(format!(
                "image {reference}: registry {} cannot be reached",
                r.host
            )))
        }
    }
}

/// A sample of the chunk ids of a registry image, enough to tell how much of it a cache holds
/// (a few pages of its chunk table; a 100 GiB image's 1.6 M ids would be 52 MB to keep).
pub(crate) fn chunk_ids(
    data: &Path,
    reference: &str,
) -> anyhow::Result<Vec<warren_image::ChunkId>> {
    let r = RegistryRef::parse(reference)?;
    Ok(warren_store::images::sample_chunk_ids(
        &registry(data, &r)?,
        &r.reference,
    )?)
}

fn check_local_name(name: &str) -> anyhow::Result<()> {
    let Some((repo, tag)) = name.rsplit_once(':') else {
        bail!("`{name}` is not a local image name: expected NAME:TAG, such as `debian:bookworm`");
    };
    if warren_envfile::check_image_reference(name).is_err() || repo.is_empty() || tag.is_empty() {
        bail!(
            "`{name}` is not a local image name: expected NAME:TAG with a lowercase name, such as `debian:bookworm`"
        );
    }
    Ok(())
}

fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

fn spinner(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

pub fn run(cmd: ImageCommand, data: &Path) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Import { source, name, base } => {
            import(data, &source, &name, base.as_deref())
        }
        ImageCommand::Bootstrap(args) => bootstrap(data, &args),
        ImageCommand::Push { name, destination } => {
            let bar = bytes_bar(0, "pushing");
            let digest = push(data, &name, &destination, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            println!("pushed {name} to {destination} ({digest})");
            Ok(())
        }
        ImageCommand::Pull { source, name } => {
            let r = RegistryRef::parse(&source)?;
            let name = name.unwrap_or_else(|| {
                format!(
                    "{}:{}",
                    r.repository.rsplit('/').next().unwrap_or("image"),
                    r.reference
                )
            });
            check_local_name(&name)?;
            let local = local_store(data)?;
            let bar = bytes_bar(0, "pulling");
            let digest = copy_image(
                &registry(data, &r)?,
                &local,
                &r.reference,
                &name,
                |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                },
            )?;
            bar.finish_and_clear();
            println!("pulled {source} as {name} ({digest})");
            Ok(())
        }
        ImageCommand::Mount {
            image,
            mountpoint,
            record_trace,
            no_prefetch,
            no_background,
            stats,
            cache_limit,
            id_offset,
            ready_fd,
            shared_lease,
            digest,
            no_passthrough,
        } => {
            let mut ready = ready_fd.map(ReadyPipe::open).transpose()?;
            let limit = cache_limit.as_deref().map(crate::parse_size);
            let result = limit.transpose().and_then(|limit| {
                mount(
                    data,
                    &image,
                    &mountpoint,
                    MountFlags {
                        record_trace,
                        prefetch: !no_prefetch,
                        background: !no_background,
                        stats,
                        limit,
                        id_offset,
                        shared_lease,
                        digest,
                        passthrough: !no_passthrough,
                    },
                    &mut ready,
                )
            });
            if let (Err(e), Some(pipe)) = (&result, ready.as_mut()) {
                pipe.say(&MountSignal::Failed {
                    error: format!("{e:#}"),
                });
            }
            result
        }
        ImageCommand::Share {
            image,
            under,
            tenant,
            ready_fd,
            no_passthrough,
        } => {
            let mut ready = ready_fd.map(ReadyPipe::open).transpose()?;
            let result = share(data, &image, &under, &tenant, !no_passthrough);
            if let Some(pipe) = ready.as_mut() {
                pipe.say(&match &result {
                    Ok((tree, lease)) => MountSignal::Shared {
                        tree: tree.clone(),
                        lease: lease.clone(),
                    },
                    Err(e) => MountSignal::Failed {
                        error: format!("{e:#}"),
                    },
                });
            }
            let (tree, _) = result?;
            println!(
                "image {image}: the host's shared mount at {}",
                tree.display()
            );
            Ok(())
        }
        ImageCommand::Ls { json } => list(data, json),
        ImageCommand::Inspect { image, json } => inspect(data, &image, json),
        ImageCommand::Rm { name } => {
            if !local_store(data)?.remove_tag(&name)? {
                bail!("there is no local image `{name}`");
            }
            println!("removed {name}; run `warren image gc` to free its blobs");
            Ok(())
        }
        ImageCommand::Gc => {
            let report = local_store(data)?.gc()?;
            println!(
                "removed {} blobs, {}",
                report.blobs_removed,
                ByteSize(report.bytes_removed)
            );
            Ok(())
        }
        ImageCommand::Export { image, destination } => export(data, &image, &destination),
    }
}

/// Local images' tree indexes, decoded once per process and kept by image digest: a build
/// stores an image per step, and each reuses the chunks of every local image, so without it a
/// build of N steps on a host of M images decodes N × M indexes.
#[derive(Debug, Default)]
pub(crate) struct IndexCache(std::sync::Mutex<std::collections::HashMap<String, Arc<TreeIndex>>>);

impl IndexCache {
    fn index(&self, local: &LocalStore, reference: &str) -> anyhow::Result<Arc<TreeIndex>> {
        let digest = local.get_manifest(reference)?.1.to_string();
        if let Some(index) = self.0.lock().ok().and_then(|m| m.get(&digest).cloned()) {
            return Ok(index);
        }
        let image = open_image(local, reference)?;
        if let Ok(mut m) = self.0.lock() {
            m.insert(image.digest.to_string(), image.index.clone());
        }
        Ok(image.index)
    }
}

/// An image builder whose chunks already in `base` (by default: in any local image) are not
/// stored again, and its work folder.
fn builder_reusing(
    data: &Path,
    local: &LocalStore,
    base: Option<&str>,
) -> anyhow::Result<(TempDir, ImageBuilder)> {
    builder_reusing_cached(data, local, base, &IndexCache::default())
}

fn builder_reusing_cached(
    data: &Path,
    local: &LocalStore,
    base: Option<&str>,
    indexes: &IndexCache,
) -> anyhow::Result<(TempDir, ImageBuilder)> {
    let work = tempfile_dir(data)?;
    let mut builder = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
    let bases: Vec<String> = match base {
        Some(b) => vec![b.to_owned()],
        None => local
            .tags()?
            .into_keys()
            .filter(|t| !t.ends_with(".trace"))
            .collect(),
    };
    for b in &bases {
        match indexes.index(local, b) {
            Ok(index) => builder.reuse_chunks_of(&index),
            Err(e) if base.is_some() => {
                return Err(e).with_context(|| format!("cannot reuse the chunks of `{b}`"));
            }
            Err(_) => {} // a plain OCI image in the store has no chunks to share
        }
    }
    Ok((work, builder))
}

/// An image's settings as its stored config.
fn settings_config(settings: &warren_builder::ImageSettings) -> ImageConfig {
    ImageConfig {
        env: settings.env.clone(),
        user: settings.user.clone(),
        workdir: settings.workdir.clone(),
        entrypoint: settings.entrypoint.clone(),
        cmd: settings.cmd.clone(),
        labels: settings.labels.clone(),
        exposed_ports: settings.exposed_ports.clone(),
        author: settings.author.clone(),
        ..ImageConfig::default()
    }
}

/// Builds' images, in the local store (`warren build`).
pub(crate) struct LocalImages {
    pub data: PathBuf,
    pub indexes: IndexCache,
    /// For a tenant's build (a prebuild): a registry a Dockerfile or an environment file names
    /// is reached only under this policy. `None`: the host's own `warren build`.
    pub egress: Option<warren_runtime::EgressPolicy>,
}

impl LocalImages {
    /// Copies a registry image into the local store under its reference: a Warren image as it
    /// is, a standard OCI image imported.
    fn fetch_base(&self, reference: &str) -> anyhow::Result<()> {
        let r = RegistryRef::parse(reference)?;
        let local = local_store(&self.data)?;
        let mut remote = registry(&self.data, &r)?;
        if let Some(policy) = &self.egress
            && !policy.trusts_registry(&r.host)
        {
            remote = remote.with_address_filter(warren_builder::egress_filter(policy));
        }
        if copy_image(&remote, &local, &r.reference, reference, |_, _| {}).is_ok()
            && open_image(&local, reference).is_ok()
        {
            return Ok(());
        }
        let (_work, mut builder) = builder_reusing_cached(&self.data, &local, None, &self.indexes)?;
        let config = warren_store::oci::import_oci(&remote, &r.reference, &mut builder, |_, _| {})
            .with_context(|| format!("cannot bring {reference} from its registry"))?;
        let built = builder.finish()?;
        commit(&local, &built, config, reference)?;
        Ok(())
    }
}

impl warren_builder::ImageStore for LocalImages {
    fn settings(&self, reference: &str) -> Result<warren_builder::ImageSettings, BuildError> {
        let local = local_store(&self.data).map_err(|e| BuildError::Store(format!("{e:#}")))?;
        let image = match open_image(&local, reference) {
            Ok(image) => image,
            // A registry image is brought into the local store under its reference.
            Err(_) if RegistryRef::parse(reference).is_ok() => {
                self.fetch_base(reference)
                    .map_err(|e| BuildError::Store(format!("{e:#}")))?;
                open_image(&local, reference).map_err(|e| BuildError::Store(e.to_string()))?
            }
            Err(e) => {
                return Err(BuildError::Store(format!(
                    "{e} (a base is a local image — `warren image pull`, `import` or `bootstrap` it — or a registry image, HOST/REPOSITORY:TAG)"
                )));
            }
        };
        let c = image.config;
        Ok(warren_builder::ImageSettings {
            env: c.env,
            user: c.user,
            workdir: c.workdir,
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            labels: c.labels,
            exposed_ports: c.exposed_ports,
            author: c.author,
            digest: image.digest.to_string(),
        })
    }

    fn store(
        &self,
        name: &str,
        tar: &mut dyn Read,
        settings: &warren_builder::ImageSettings,
    ) -> Result<String, BuildError> {
        let run = || -> anyhow::Result<String> {
            check_local_name(name)?;
            let local = local_store(&self.data)?;
            let (_work, mut builder) =
                builder_reusing_cached(&self.data, &local, None, &self.indexes)?;
            import_tar(&mut builder, tar)?;
            let built = builder.finish()?;
            let config = settings_config(settings);
            Ok(commit(&local, &built, config, name)?.to_string())
        };
        run().map_err(|e| BuildError::Store(format!("{e:#}")))
    }

    fn untag(&self, name: &str) -> Result<(), BuildError> {
        local_store(&self.data)
            .and_then(|local| Ok(local.remove_tag(name)?))
            .map(drop)
            .map_err(|e| BuildError::Store(format!("{e:#}")))
    }

    fn retag(
        &self,
        name: &str,
        from: &str,
        settings: &warren_builder::ImageSettings,
    ) -> Result<String, BuildError> {
        let run = || -> anyhow::Result<String> {
            check_local_name(name)?;
            let local = local_store(&self.data)?;
            let image = open_image(&local, from)?;
            let built = warren_image::Built {
                index: (*image.index).clone(),
                new_packs: Vec::new(),
                stats: Default::default(),
            };
            Ok(commit(&local, &built, settings_config(settings), name)?.to_string())
        };
        run().map_err(|e| BuildError::Store(format!("{e:#}")))
    }

    fn store_changes(
        &self,
        name: &str,
        layer: &warren_runtime::WritableLayer,
        settings: &warren_builder::ImageSettings,
    ) -> Result<Option<String>, BuildError> {
        let run = || -> anyhow::Result<Option<String>> {
            check_local_name(name)?;
            let local = local_store(&self.data)?;
            // A sandbox over a registry image: its tree is not here to start from.
            let Ok(parent) = open_image(&local, &layer.image) else {
                return Ok(None);
            };
            // Every local image's chunks: a prebuild's checkout is mostly the last one's.
            let (_work, mut builder) =
                builder_reusing_cached(&self.data, &local, None, &self.indexes)?;
            builder.start_from(&parent.index);
            match warren_image::apply_overlay_upper(&mut builder, &layer.upper, layer.id_offset) {
                Ok(()) => {}
                Err(e @ warren_image::OverlayImportError::NotSelfContained { .. }) => {
                    tracing::info!(error = %e, "storing the whole tree");
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
            let built = builder.finish()?;
            let config = settings_config(settings);
            Ok(Some(commit(&local, &built, config, name)?.to_string()))
        };
        run().map_err(|e| BuildError::Store(format!("{e:#}")))
    }
}

fn import(data: &Path, source: &str, name: &str, base: Option<&str>) -> anyhow::Result<()> {
    check_local_name(name)?;
    let local = local_store(data)?;
    // Identical content is stored once across all local images.
    let (_work, mut builder) = builder_reusing(data, &local, base)?;
    let started = Instant::now();
    let bar = spinner(&format!("importing {source}"));
    let config = if let Some(rest) = source.strip_prefix("docker://") {
        let r = RegistryRef::parse(rest)?;
        warren_store::oci::import_oci(&registry(data, &r)?, &r.reference, &mut builder, |i, n| {
            bar.set_message(format!("importing {source}: layer {i}/{n}"))
        })?
    } else if let Some(rest) = source.strip_prefix("oci:") {
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') => (d, t),
            _ => (rest, "latest"),
        };
        let layout = LocalStore::open(Path::new(dir))?;
        let tag = if layout.tags()?.contains_key(tag) {
            tag.to_owned()
        } else {
            let tags = layout.tags()?;
            match tags.len() {
                1 => tags.into_keys().next().expect("one tag"),
                _ => bail!(
                    "`{dir}` has no image tagged `{tag}` (it has: {})",
                    layout.tags()?.into_keys().collect::<Vec<_>>().join(", ")
                ),
            }
        };
        warren_store::oci::import_oci(&layout, &tag, &mut builder, |i, n| {
            bar.set_message(format!("importing {source}: layer {i}/{n}"))
        })?
    } else if source == "-" {
        import_tar(
            &mut builder,
            decompressed(Box::new(std::io::stdin().lock()))?,
        )?;
        ImageConfig::default()
    } else {
        let path = Path::new(source);
        let meta = std::fs::metadata(path).with_context(|| format!("cannot open `{source}`"))?;
        if meta.is_dir() {
            import_dir(&mut builder, path)?;
        } else {
            let file =
                std::fs::File::open(path).with_context(|| format!("cannot open `{source}`"))?;
            import_tar(
                &mut builder,
                decompressed(Box::new(std::io::BufReader::new(file)))?,
            )?;
        }
        ImageConfig::default()
    };
    let built = builder.finish()?;
    bar.set_message(format!("storing {name}"));
    let config = ImageConfig {
        parent: None,
        ..config
    };
    let digest = commit(&local, &built, config, name)?;
    bar.finish_and_clear();
    let s = built.stats;
    println!(
        "imported {name} ({digest}) in {:.1}s: {} entries, {} files, {} of data; {} new chunks ({} stored), {} reused",
        started.elapsed().as_secs_f64(),
        built.index.entries.len(),
        s.files,
        ByteSize(s.file_bytes),
        s.new_chunks,
        ByteSize(s.stored_bytes),
        s.reused_chunks
    );
    Ok(())
}

/// What mmdebstrap takes as a suite, a variant or a package name (no options smuggled in).
fn plain_word(word: &str) -> bool {
    !word.is_empty()
        && !word.starts_with('-')
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '+' | ':' | '_'))
}

fn bootstrap(data: &Path, args: &BootstrapArgs) -> anyhow::Result<()> {
    let BootstrapArgs {
        image,
        mirror,
        keyring,
        variant,
        include,
        tag,
    } = args;
    let Some(suite) = image.strip_prefix("debian:").filter(|s| plain_word(s)) else {
        bail!("`{image}`: expected debian:SUITE, such as debian:bookworm");
    };
    if !plain_word(variant) {
        bail!("`{variant}` is not an mmdebstrap variant");
    }
    if let Some(bad) = include.iter().find(|p| !plain_word(p)) {
        bail!("`{bad}` is not a package name");
    }
    if !(mirror.starts_with("http://")
        || mirror.starts_with("https://")
        || mirror.starts_with("file://"))
    {
        bail!("the mirror `{mirror}` should be an http://, https:// or file:// URL");
    }
    // The keyring goes into the image's apt keyrings (so apt inside trusts the mirror too),
    // through an mmdebstrap hook: a path it can split on spaces is refused.
    let keyring = match keyring {
        Some(path) => {
            let head = std::fs::read(path)
                .ok()
                .filter(|_| path.is_file())
                .with_context(|| format!("the keyring `{}` is not a file", path.display()))?;
            if path
                .to_str()
                .is_none_or(|p| p.chars().any(char::is_whitespace))
            {
                bail!("the keyring's path `{}` has spaces", path.display());
            }
            let armored = head.starts_with(b"-----BEGIN PGP");
            Some((path, if armored { "asc" } else { "gpg" }))
        }
        None => None,
    };
    let name = tag.as_deref().unwrap_or(image);
    check_local_name(name)?;
    let work = tempfile_dir(data)?;
    let rootfs = work.path().join("rootfs");
    let mut cmd = std::process::Command::new("mmdebstrap");
    cmd.args(["--mode=root", "--quiet"])
        .arg(format!("--variant={variant}"));
    if let Some((path, kind)) = keyring {
        // Trusted by the bootstrap, and by apt in the image afterwards.
        cmd.arg(format!("--keyring={}", path.display()))
            .arg(r#"--setup-hook=mkdir -p "$1/etc/apt/trusted.gpg.d""#)
            .arg(format!(
                "--setup-hook=upload {} /etc/apt/trusted.gpg.d/warren-mirror.{kind}",
                path.display()
            ));
    }
    // A mirror on this host's disk is bind-mounted into the new tree while apt reads it; in a
    // mount namespace of mmdebstrap's own, so a failed run leaves no bind mount of the mirror
    // under the work folder for its removal to delete through.
    if mirror.starts_with("file://") {
        cmd.arg("--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount");
    }
    // SAFETY: between fork and exec the closure makes only two syscalls (unshare, mount), which
    // allocate nothing and take no locks.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            Ok(())
        });
    }
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    cmd.arg(suite).arg(&rootfs).arg(mirror);
    let bar = spinner(&format!("building {image} with mmdebstrap from {mirror}"));
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run mmdebstrap ({e}): apt install mmdebstrap"))?;
    bar.finish_and_clear();
    if !out.status.success() {
        bail!(
            "mmdebstrap could not build {image}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    import(data, &rootfs.display().to_string(), name, None)
}

/// A work folder for pack files, on the same filesystem as the store so packs can be moved in.
/// A work folder of its own under `<data>/tmp` (builds may run side by side in one process),
/// removed when dropped.
fn tempfile_dir(data: &Path) -> anyhow::Result<TempDir> {
    let dir = data.join("tmp");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&dir)
        .with_context(|| format!("cannot create a folder in `{}`", dir.display()))
}

/// Detects gzip and zstd by their magic numbers.
fn decompressed(mut input: Box<dyn std::io::BufRead>) -> anyhow::Result<Box<dyn Read>> {
    let head = input
        .fill_buf()
        .context("cannot read the tar stream")?
        .to_vec();
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2_decoder(input))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd_decoder(input)?)
    } else {
        input
    })
}

fn flate2_decoder(input: Box<dyn std::io::BufRead>) -> impl Read {
    flate2::bufread::GzDecoder::new(input)
}

fn zstd_decoder(input: Box<dyn std::io::BufRead>) -> anyhow::Result<impl Read> {
    Ok(zstd::Decoder::with_buffer(input)?)
}

struct MountFlags {
    record_trace: Option<u64>,
    prefetch: bool,
    background: bool,
    stats: Option<PathBuf>,
    limit: Option<u64>,
    id_offset: u32,
    shared_lease: Option<PathBuf>,
    digest: Option<String>,
    passthrough: bool,
}

/// The host's one mount of `reference` for `tenant` under `under` (see
/// `warren_runtime::image_sharing::find_or_start`): its tree and lease. One per tenant, image
/// and store the image comes from (its chunks are read from there), and way of reading.
fn share(
    data: &Path,
    reference: &str,
    under: &Path,
    tenant: &str,
    passthrough: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let deadline = Instant::now() + warren_runtime::image_sharing::SHARE_LIMIT;
    let (opening, name) = resolve(data, reference, Retry::default())?;
    let (_, digest) = opening
        .get_manifest(&name)
        .map_err(|e| warren_lazyfs::serve::ServeError::opening(reference, e))?;
    let reads = if passthrough { "" } else { "\0no-passthrough" };
    let key = Digest::of(format!("{tenant}\0{}\0{digest}{reads}", opening.describe()).as_bytes());
    let exe = std::env::current_exe().context("cannot find this program")?;
    warren_runtime::image_sharing::find_or_start(under, &key.hex(), deadline, |tree, lease| {
        let mut server = std::process::Command::new(&exe);
        server
            .arg("--data")
            .arg(data)
            .args(["image", "mount", reference])
            .arg(tree)
            .arg("--shared-lease")
            .arg(lease)
            .args(["--digest", &digest.to_string()])
            .args((!passthrough).then_some("--no-passthrough"));
        server
    })
    .map_err(anyhow::Error::msg)
}

/// How long a shared mount stays with nobody holding its lease (a workspace's supervisor that
/// crashed; the last one out ends it at once).
const UNHELD_LIMIT: Duration = Duration::from_secs(10);

/// The readiness pipe of a mount its starter waits on: said to once, then closed.
struct ReadyPipe(Option<std::fs::File>);

impl ReadyPipe {
    fn open(fd: i32) -> anyhow::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // Only a descriptor the starter gave: not a standard stream, and open.
        // SAFETY: fcntl(F_GETFD) only reads the descriptor's flags.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            bail!("--ready-fd {fd} is not an open descriptor above 2");
        }
        // SAFETY: the descriptor is open (checked above), given to this process by its starter
        // for this use alone, and owned from here on by the returned file.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        // Not passed on to anything this process runs.
        // SAFETY: as above; FD_CLOEXEC only changes the descriptor's flags.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Self(Some(file)))
    }

    /// Sends the signal and closes the pipe; later signals go nowhere.
    fn say(&mut self, signal: &MountSignal) {
        if let Some(mut file) = self.0.take() {
            let _ = signal.send(&mut file);
        }
    }
}

fn mount(
    data: &Path,
    reference: &str,
    mountpoint: &Path,
    flags: MountFlags,
    ready: &mut Option<ReadyPipe>,
) -> anyhow::Result<()> {
    // A mount lives as long as its workspace, mostly idle. Buffers of 256 KiB and more (fetch
    // batches) come straight from mmap and go back to the kernel when freed, instead of
    // staying in glibc's heap after the prefetch; one arena bounds what the threads keep.
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // Opening answers soon (a missing image or a registry that refuses ends the mount at
    // once, saying so); reads of the mounted tree retry patiently, to outlive a registry's
    // restart.
    let (opening, name) = resolve(data, reference, Retry::default())?;
    let (store, _) = resolve(data, reference, Retry::patient())?;
    let cache = Arc::new(ChunkCache::open(&data.join("cache"), flags.limit)?);
    let mut served = warren_lazyfs::serve::serve(warren_lazyfs::serve::ServeRequest {
        reference,
        opening: opening.as_ref(),
        store,
        name: &name,
        cache,
        mountpoint,
        id_offset: flags.id_offset,
        record_trace: flags.record_trace.map(Duration::from_secs),
        prefetch: flags.prefetch,
        background: flags.background,
        shared: flags.shared_lease.is_some(),
        digest: flags.digest.as_deref(),
        passthrough: flags.passthrough,
    })?;
    let index = served.image.index.clone();
    if let Some(pipe) = ready.as_mut() {
        pipe.say(&MountSignal::Mounted {
            entries: index.entries.len() as u64,
            data_bytes: index.data_bytes(),
        });
    }
    println!(
        "mounted {reference} at {} ({} entries, {}; trace {}; background pull {}); SIGTERM or Ctrl-C unmounts",
        mountpoint.display(),
        index.entries.len(),
        ByteSize(index.data_bytes()),
        if served.replaying {
            "replaying"
        } else {
            "none"
        },
        if flags.background { "on" } else { "off" }
    );

    let term = Arc::new(AtomicBool::new(false));
    let save_now = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone())
            .context("cannot install a signal handler")?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, save_now.clone())
        .context("cannot install a signal handler")?;
    let mut unheld_since = Some(Instant::now());
    let mut last_lease_check = Instant::now();
    // Kept while the mount ends, so that no workspace takes it meanwhile.
    let mut _whole_lease = None;
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if served.ended() {
            break;
        }
        if let Some(lease) = &flags.shared_lease
            && last_lease_check.elapsed() >= Duration::from_secs(1)
        {
            last_lease_check = Instant::now();
            match WholeLease::try_take(lease) {
                Ok(Some(whole)) => {
                    let since = *unheld_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= UNHELD_LIMIT {
                        _whole_lease = Some(whole);
                        break;
                    }
                }
                Ok(None) => unheld_since = None,
                // Its folder was removed: nobody can take it any more.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => tracing::warn!(error = %e, "cannot check the shared mount's lease"),
            }
        }
        if let Some(saved) = served.save_trace_when_due(save_now.swap(false, Ordering::Relaxed)) {
            say_trace(saved);
        }
        if let Some(path) = &flags.stats {
            write_stats(path, &served.stats());
        }
    }
    let (stats, saved) = served.unmount();
    if let Some(generation) = flags.shared_lease.as_deref().and_then(Path::parent) {
        // Its folder's name is never used again.
        warren_runtime::image_sharing::remove_generation(generation);
    }
    if let Some(saved) = saved {
        say_trace(saved);
    }
    if let Some(path) = &flags.stats {
        write_stats(path, &stats);
    }
    println!(
        "unmounted {}: fetched {} in {} requests",
        mountpoint.display(),
        ByteSize(stats.bytes_fetched),
        stats.requests
    );
    Ok(())
}

fn say_trace(saved: Result<trace::Trace, StoreError>) {
    match saved {
        Ok(t) => println!("recorded a trace of {} chunks", t.len()),
        Err(e) => eprintln!("warning: the trace could not be stored: {e}"),
    }
}

fn write_stats(path: &Path, stats: &pull::Stats) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(stats).expect("stats serialize"),
    )
    .is_ok()
    {
        let _ = std::fs::rename(&tmp, path);
    }
}

#[derive(Serialize)]
struct Listed {
    name: String,
    digest: String,
    kind: String,
    entries: u64,
    data_bytes: u64,
}

fn list(data: &Path, json: bool) -> anyhow::Result<()> {
    let local = local_store(data)?;
    let mut rows = Vec::new();
    for (name, digest) in local.tags()? {
        if name.ends_with(".trace") {
            continue;
        }
        let row = match open_image(&local, &name) {
            Ok(img) => Listed {
                name,
                digest: digest.to_string(),
                kind: "warren".into(),
                entries: img.config.entries,
                data_bytes: img.config.data_bytes,
            },
            Err(_) => Listed {
                name,
                digest: digest.to_string(),
                kind: "oci".into(),
                entries: 0,
                data_bytes: 0,
            },
        };
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<32} {:<19} {:>9} {:>12}",
            "NAME", "DIGEST", "ENTRIES", "SIZE"
        );
        for r in rows {
            println!(
                "{:<32} {:<19} {:>9} {:>12}",
                r.name,
                &r.digest[..19],
                r.entries,
                ByteSize(r.data_bytes).to_string()
            );
        }
    }
    Ok(())
}

fn inspect(data: &Path, reference: &str, json: bool) -> anyhow::Result<()> {
    let (store, name) = resolve(data, reference, Retry::patient())?;
    let image = open_image(store.as_ref(), &name)?;
    let stored: u64 = image.manifest.layers.iter().map(|l| l.size).sum();
    let report = serde_json::json!({
        "reference": reference,
        "digest": image.digest.to_string(),
        "config": image.config,
        "entries": image.index.entries.len(),
        "dataBytes": image.index.data_bytes(),
        "chunks": image.index.chunks.len(),
        "packs": image.index.blobs.len(),
        "storedBytes": stored,
        "manifest": image.manifest,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{reference}\n  digest   {}\n  entries  {}\n  data     {}\n  chunks   {} in {} packs ({} stored)",
            image.digest,
            image.index.entries.len(),
            ByteSize(image.index.data_bytes()),
            image.index.chunks.len(),
            image.index.blobs.len(),
            ByteSize(stored)
        );
        let c = &image.config;
        let quoted = |argv: &[String]| serde_json::to_string(argv).unwrap_or_default();
        if !c.env.is_empty() {
            println!("  env      {}", c.env.join(" "));
        }
        for (name, value) in [
            ("user", c.user.clone()),
            ("workdir", c.workdir.clone()),
            (
                "entrypoint",
                (!c.entrypoint.is_empty()).then(|| quoted(&c.entrypoint)),
            ),
            ("cmd", (!c.cmd.is_empty()).then(|| quoted(&c.cmd))),
            (
                "ports",
                (!c.exposed_ports.is_empty()).then(|| c.exposed_ports.join(" ")),
            ),
            ("author", c.author.clone()),
        ] {
            if let Some(value) = value {
                println!("  {name:<8} {value}");
            }
        }
        for (key, value) in &c.labels {
            println!("  label    {key}={value}");
        }
    }
    Ok(())
}

fn export(data: &Path, reference: &str, destination: &str) -> anyhow::Result<()> {
    let Some(rest) = destination.strip_prefix("oci:") else {
        bail!("`{destination}`: expected oci:DIR:TAG");
    };
    let (dir, tag) = rest
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .unwrap_or((rest, "latest"));
    let (store, name) = resolve(data, reference, Retry::patient())?;
    let (image, table) = warren_store::images::open_image_lazily(store.as_ref(), &name)?;
    let cache = Arc::new(ChunkCache::open(&data.join("cache"), None)?);
    let fetcher = ChunkFetcher::new(store.clone(), cache, image.index.clone(), table, 8 << 20);
    let dest = LocalStore::open(Path::new(dir))?;
    let work = tempfile_dir(data)?;
    let bar = spinner(&format!("exporting {reference}"));
    let digest = warren_store::oci::export_oci(&fetcher, &image.config, &dest, tag, work.path())?;
    bar.finish_and_clear();
    println!("exported {reference} to {destination} ({digest})");
    Ok(())
}
