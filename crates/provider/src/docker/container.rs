//! Containers: create, wait for the agent, destroy, list, inspect, logs,
//! pause and resume.

use super::run_dir::{agent_peer, create_run_root, mount_run_dir, unmount_run_dir};
use super::*;

pub(super) fn check_env(env: &std::collections::BTreeMap<String, String>) -> Result<Vec<String>> {
    env.iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                Err(Error::InvalidRequest(format!(
                    "environment variable {k:?} is invalid: names are non-empty without '=' and nothing may contain a NUL byte"
                )))
            } else {
                Ok(format!("{k}={v}"))
            }
        })
        .collect()
}

/// A one-line summary of a container's state for errors and logs.
pub(super) fn describe_state(c: &ContainerInspectResponse) -> String {
    let Some(state) = &c.state else {
        return "state unknown".into();
    };
    let mut s = format!(
        "state {}",
        state
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown".into())
    );
    if let Some(code) = state.exit_code {
        if state.running != Some(true) {
            s.push_str(&format!(", exit code {code}"));
        }
    }
    if state.oom_killed == Some(true) {
        s.push_str(", OOM killed (the memory limit was reached)");
    }
    if let Some(err) = state.error.as_deref().filter(|e| !e.is_empty()) {
        s.push_str(&format!(", error: {err}"));
    }
    s
}

pub(super) fn parse_docker_time(s: Option<&str>) -> Option<OffsetDateTime> {
    let s = s?;
    // Docker reports never-set times as the zero time.
    if s.starts_with("0001-") {
        return None;
    }
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

impl Inner {
    pub(super) async fn spawn(self: &Arc<Self>, spec: &SpawnSpec) -> Result<()> {
        let id = &spec.sandbox_id;
        if !(spec.cpu.is_finite() && spec.cpu > 0.0) {
            return Err(Error::InvalidRequest(format!(
                "cpu must be a positive number, not {}",
                spec.cpu
            )));
        }
        if spec.memory_mb < MIN_MEMORY_MB || spec.memory_mb > (i64::MAX as u64) / (1024 * 1024) {
            return Err(Error::InvalidRequest(format!(
                "memory_mb must be at least {MIN_MEMORY_MB} (Docker's minimum), not {}",
                spec.memory_mb
            )));
        }
        let env = check_env(&spec.env)?;
        let workdir = spec
            .workdir
            .as_deref()
            .map(validate_sandbox_path)
            .transpose()?;
        let socket = self.socket_path(id);
        if socket.as_os_str().len() > SUN_PATH_MAX {
            return Err(Error::InvalidRequest(format!(
                "sandbox id {id} is too long for an agent socket path (108-byte limit)"
            )));
        }
        let agent_bin = self.cfg.agent_bin.canonicalize().ok().filter(|p| p.is_file()).ok_or_else(|| {
            Error::ProviderUnavailable(format!(
                "the agent binary {} is missing: build it with scripts/build-agent.sh or set STACYVM_AGENT_BIN",
                self.cfg.agent_bin.display()
            ))
        })?;
        let docker = self.docker().await?;
        let image = self.resolve_image(&docker, &spec.image).await?;
        let network_mode = match spec.network {
            Network::None if !spec.egress_allow.is_empty() => {
                return Err(Error::InvalidRequest(
                    "an egress allow list needs network \"egress\", not \"none\"".into(),
                ))
            }
            Network::None => "none",
            Network::Egress => self.egress_network_ready(&docker).await?,
        };
        let upstreams = if spec.egress_allow.is_empty() {
            Vec::new()
        } else {
            self.egress_upstreams()?
        };

        let run_dir = self.run_root.join(id.as_str());
        let mut attempts = 0;
        loop {
            attempts += 1;
            let made = create_run_root(&self.run_root)
                .and_then(|()| std::fs::DirBuilder::new().mode(0o700).create(&run_dir));
            match made {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(Error::Conflict(format!(
                        "sandbox {id} already exists on this Docker provider"
                    )));
                }
                // A destroy removed the shared root between the two steps.
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 5 => {}
                Err(e) => {
                    return Err(Error::internal(
                        format_args!("creating {}", run_dir.display()),
                        e,
                    ))
                }
            }
        }
        if self.run_dir_tmpfs.is_ok() {
            if let Err(e) = mount_run_dir(&run_dir) {
                let _ = std::fs::remove_dir(&run_dir);
                return Err(Error::ProviderUnavailable(format!(
                    "mounting a tmpfs on the socket directory {}: {e}",
                    run_dir.display()
                )));
            }
        }
        // From here on, any failure (or the caller giving up) removes what
        // was made.
        let mut cleanup = SpawnCleanup {
            target: Some((self.clone(), id.clone())),
        };

        let name = self.container_name(id);
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_INSTANCE.to_owned(), self.cfg.instance.clone()),
            (LABEL_SANDBOX.to_owned(), id.to_string()),
        ]);
        // The sandbox's resolver is StacyVM's DNS filter, on a read-only
        // file Docker then leaves alone (it writes its own resolv.conf only
        // where no mount covers it).
        let mut resolver_mount = None;
        if !spec.egress_allow.is_empty() {
            let path = self.prepare_allow_list(id).await?;
            resolver_mount = Some(Mount {
                target: Some("/etc/resolv.conf".into()),
                source: Some(path.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                read_only: Some(true),
                ..Default::default()
            });
            labels.insert(
                LABEL_EGRESS_ALLOW.to_owned(),
                serde_json::to_string(&spec.egress_allow)
                    .map_err(|e| Error::internal("encoding the allow list", e))?,
            );
        }
        let host_config = HostConfig {
            init: Some(true),
            security_opt: Some(vec!["no-new-privileges".into()]),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(CAPABILITIES_KEPT.iter().map(|c| (*c).to_owned()).collect()),
            pids_limit: Some(self.cfg.pids_limit),
            memory: Some((spec.memory_mb * 1024 * 1024) as i64),
            memory_swap: Some((spec.memory_mb * 1024 * 1024) as i64),
            nano_cpus: Some((spec.cpu * 1e9).round() as i64),
            network_mode: Some(network_mode.into()),
            ipc_mode: Some("private".into()),
            mounts: Some(
                vec![
                    Mount {
                        target: Some(AGENT_PATH_IN_SANDBOX.into()),
                        source: Some(agent_bin.to_string_lossy().into_owned()),
                        typ: Some(MountType::BIND),
                        read_only: Some(true),
                        ..Default::default()
                    },
                    Mount {
                        target: Some(RUN_DIR_IN_SANDBOX.into()),
                        source: Some(run_dir.to_string_lossy().into_owned()),
                        typ: Some(MountType::BIND),
                        read_only: Some(false),
                        ..Default::default()
                    },
                ]
                .into_iter()
                // Volumes: Docker resolves each target inside the container's
                // own root, so a symlink planted in the image cannot redirect
                // the bind onto the host.
                .chain(spec.mounts.iter().map(|m| Mount {
                    target: Some(m.target.clone()),
                    source: Some(m.source.clone()),
                    typ: Some(MountType::BIND),
                    read_only: Some(m.read_only),
                    ..Default::default()
                }))
                .chain(resolver_mount)
                .collect(),
            ),
            // The agent's own log; command output travels over the socket.
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), "10m".to_owned()),
                    ("max-file".to_owned(), "1".to_owned()),
                ])),
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            entrypoint: Some(vec![
                AGENT_PATH_IN_SANDBOX.into(),
                "--listen".into(),
                format!("{RUN_DIR_IN_SANDBOX}/{SOCKET_NAME}"),
            ]),
            cmd: Some(vec![]),
            env: Some(env),
            working_dir: workdir,
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        if let Err(e) = docker.create_container(Some(options), body).await {
            if is_status(&e, 409) {
                // Another container already holds this sandbox's name: it is
                // not ours to remove.
                cleanup.disarm();
                let _ = unmount_run_dir(&run_dir);
                let _ = tokio::fs::remove_dir(&run_dir).await;
                return Err(Error::Conflict(format!(
                    "sandbox {id} already exists on this Docker provider"
                )));
            }
            let err = self.docker_error(format_args!("creating the container for sandbox {id}"), e);
            cleanup.run().await;
            return Err(err);
        }
        if let Err(e) = docker.start_container(&name, None).await {
            let err = self.docker_error(format_args!("starting the container for sandbox {id}"), e);
            let output = self
                .recent_output(&docker, &name, SPAWN_ERROR_LOG_TAIL)
                .await;
            cleanup.run().await;
            return Err(with_output(err, &output));
        }
        // The filter is in place before the agent is reported ready, so no
        // command of the sandbox ever runs without it.
        if !spec.egress_allow.is_empty() {
            if let Err(err) = self
                .arm_allow_list(&docker, &name, id, &spec.egress_allow, upstreams)
                .await
            {
                cleanup.run().await;
                return Err(err);
            }
        }
        match self.wait_for_agent(&docker, &name, &socket).await {
            Ok(client) => {
                self.agents_cache().insert(id.clone(), client);
                cleanup.disarm();
                tracing::info!(sandbox = %id, image = %image, container = %name, "docker sandbox running");
                Ok(())
            }
            Err(err) => {
                let output = self
                    .recent_output(&docker, &name, SPAWN_ERROR_LOG_TAIL)
                    .await;
                cleanup.run().await;
                Err(with_output(err, &output))
            }
        }
    }

    /// Polls until the agent answers `health()` on its socket, the container
    /// stops, or the deadline passes.
    pub(super) async fn wait_for_agent(
        &self,
        docker: &Docker,
        name: &str,
        socket: &Path,
    ) -> Result<Arc<AgentClient>> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut delay = Duration::from_millis(10);
        let mut last_error = String::from("the agent socket did not appear");
        let peer = agent_peer(
            &docker
                .inspect_container(name, None)
                .await
                .map_err(|e| self.docker_error("checking the sandbox container", e))?,
        );
        loop {
            if tokio::fs::try_exists(socket).await.unwrap_or(false) {
                let remaining = deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(5));
                let attempt = tokio::time::timeout(remaining, async {
                    let client = AgentClient::connect_unix_checked(socket, &peer).await?;
                    client.health().await?;
                    Ok::<_, Error>(client)
                })
                .await;
                match attempt {
                    Ok(Ok(client)) => return Ok(Arc::new(client)),
                    Ok(Err(e)) => last_error = e.message(),
                    Err(_) => {
                        last_error = "the agent did not answer its health check in time".into()
                    }
                }
            }
            let inspected = docker
                .inspect_container(name, None)
                .await
                .map_err(|e| self.docker_error("checking the sandbox container", e))?;
            let running = inspected
                .state
                .as_ref()
                .and_then(|s| s.running)
                .unwrap_or(false);
            if !running {
                return Err(Error::ProviderUnavailable(format!(
                    "the sandbox container stopped before its agent answered ({})",
                    describe_state(&inspected)
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::ProviderUnavailable(format!(
                    "the sandbox agent did not answer within {} s (last error: {last_error})",
                    READY_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    /// The last lines the container printed, for error messages.
    pub(super) async fn recent_output(&self, docker: &Docker, name: &str, tail: &str) -> String {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(tail)
            .build();
        let mut stream = docker.logs(name, Some(options));
        let mut out = String::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => out.push_str(&String::from_utf8_lossy(chunk.as_ref())),
                Err(_) => break,
            }
        }
        out.trim().to_owned()
    }

    /// Removes a sandbox's container and host directory; nothing to remove
    /// is success.
    pub(super) async fn destroy(&self, id: &SandboxId) -> Result<()> {
        self.forget(id);
        self.disarm_allow_list(id).await?;
        let docker = self.docker().await?;
        let name = self.container_name(id);
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match docker.remove_container(&name, Some(options)).await {
            Ok(()) => {}
            Err(e) if is_status(&e, 404) => {}
            // Another destroy is removing it: wait until it is gone.
            Err(e) if is_status(&e, 409) => self.wait_until_removed(&docker, &name).await?,
            Err(e) => {
                return Err(
                    self.docker_error(format_args!("removing the container of sandbox {id}"), e)
                )
            }
        }
        let run_dir = self.run_root.join(id.as_str());
        tokio::task::spawn_blocking(move || {
            unmount_run_dir(&run_dir)?;
            remove_tree(&run_dir)
        })
        .await
        .map_err(|e| Error::internal("the socket directory removal task failed", e))?
        .map_err(|e| {
            Error::internal(
                format_args!("removing the socket directory of sandbox {id}"),
                e,
            )
        })?;
        if self.run_root_shared {
            // Fails (and is meant to) while other sandboxes still use it.
            let _ = std::fs::remove_dir(&self.run_root);
        }
        // A connection made while the container was being removed.
        self.forget(id);
        Ok(())
    }

    pub(super) async fn wait_until_removed(&self, docker: &Docker, name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match docker.inspect_container(name, None).await {
                Err(e) if is_status(&e, 404) => return Ok(()),
                Err(e) => return Err(self.docker_error("waiting for a container removal", e)),
                Ok(_) if Instant::now() >= deadline => {
                    return Err(Error::Timeout(format!(
                        "container {name} was still being removed after 30 s"
                    )));
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub(super) fn forget(&self, id: &SandboxId) {
        self.agents_cache().remove(id);
        self.paused_set().remove(id);
    }

    pub(super) async fn list(&self) -> Result<Vec<RuntimeInfo>> {
        let docker = self.docker().await?;
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_INSTANCE}={}", self.cfg.instance),
            ],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.docker_error("listing sandbox containers", e))?;
        let mut rearm = Vec::new();
        let mut out: Vec<RuntimeInfo> = containers
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels?;
                // The daemon filtered already; checking again keeps a label
                // filter quirk from ever handing over another server's sandbox.
                if labels.get(LABEL_INSTANCE) != Some(&self.cfg.instance) {
                    return None;
                }
                let sandbox_id = SandboxId::parse(labels.get(LABEL_SANDBOX)?)?;
                let running = matches!(
                    c.state,
                    Some(ContainerSummaryStateEnum::RUNNING)
                        | Some(ContainerSummaryStateEnum::PAUSED)
                        | Some(ContainerSummaryStateEnum::RESTARTING)
                );
                if running {
                    if let Some(list) = labels.get(LABEL_EGRESS_ALLOW) {
                        rearm.push((sandbox_id.clone(), list.clone()));
                    }
                }
                Some(RuntimeInfo {
                    sandbox_id,
                    running,
                })
            })
            .collect();
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        for (id, list) in rearm {
            self.rearm_allow_list(&docker, &id, &list).await;
        }
        Ok(out)
    }

    /// Inspects a sandbox's container; `NotFound` when it does not exist.
    pub(super) async fn inspect(
        &self,
        docker: &Docker,
        id: &SandboxId,
    ) -> Result<ContainerInspectResponse> {
        match docker
            .inspect_container(&self.container_name(id), None)
            .await
        {
            Ok(c) => Ok(c),
            Err(e) if is_status(&e, 404) => {
                Err(Error::NotFound(format!("sandbox {id} has no container")))
            }
            Err(e) => Err(self.docker_error(format_args!("inspecting sandbox {id}"), e)),
        }
    }

    pub(super) async fn logs(&self, id: &SandboxId) -> Result<Vec<LogLine>> {
        let docker = self.docker().await?;
        let c = self.inspect(&docker, id).await?;
        let now = stacyvm_core::now();
        let provider = |ts: OffsetDateTime, message: String| LogLine {
            ts,
            source: "provider".into(),
            message,
        };
        let mut lines = Vec::new();
        let state = c.state.as_ref();
        if let Some(ts) = parse_docker_time(state.and_then(|s| s.started_at.as_deref())) {
            lines.push(provider(
                ts,
                format!("container {} started", self.container_name(id)),
            ));
        }
        if let Some(ts) = parse_docker_time(state.and_then(|s| s.finished_at.as_deref())) {
            lines.push(provider(
                ts,
                format!("container {} finished", self.container_name(id)),
            ));
        }
        lines.push(provider(
            now,
            format!(
                "container {} (image {}): {}",
                self.container_name(id),
                c.config
                    .as_ref()
                    .and_then(|c| c.image.as_deref())
                    .unwrap_or("unknown"),
                describe_state(&c)
            ),
        ));

        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .tail(LOG_TAIL)
            .build();
        let mut stream = docker.logs(&self.container_name(id), Some(options));
        let mut raw = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                self.docker_error(format_args!("reading the logs of sandbox {id}"), e)
            })?;
            raw.extend_from_slice(chunk.as_ref());
        }
        for line in String::from_utf8_lossy(&raw).lines() {
            if line.is_empty() {
                continue;
            }
            let (ts, message) = match line.split_once(' ') {
                Some((ts, rest)) => match OffsetDateTime::parse(ts, &Rfc3339) {
                    Ok(ts) => (ts, rest),
                    Err(_) => (now, line),
                },
                None => (now, line),
            };
            lines.push(LogLine {
                ts,
                source: "runtime".into(),
                message: message.to_owned(),
            });
        }
        lines.sort_by_key(|l| l.ts);
        Ok(lines)
    }

    pub(super) async fn agent(&self, id: &SandboxId) -> Result<Arc<AgentClient>> {
        if self.paused_set().contains(id) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is paused: resume it first"
            )));
        }
        let cached = self.agents_cache().get(id).cloned();
        if let Some(client) = cached {
            if client.is_alive() {
                return Ok(client);
            }
        }
        let (socket, peer) = self.agent_endpoint(id).await?;
        let client = Arc::new(
            AgentClient::connect_unix_checked(&socket, &peer)
                .await
                .map_err(|e| {
                    Error::ProviderUnavailable(format!(
                        "cannot reach the agent of sandbox {id}: {}",
                        e.message()
                    ))
                })?,
        );
        let mut agents = self.agents_cache();
        // Keep a live connection another caller made meanwhile.
        match agents.get(id) {
            Some(existing) if existing.is_alive() => Ok(existing.clone()),
            _ => {
                agents.insert(id.clone(), client.clone());
                Ok(client)
            }
        }
    }

    pub(super) async fn agent_stream(&self, id: &SandboxId) -> Result<tokio::net::UnixStream> {
        if self.paused_set().contains(id) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is paused: resume it first"
            )));
        }
        let (socket, peer) = self.agent_endpoint(id).await?;
        crate::agent_client::connect_unix_raw(&socket, &peer)
            .await
            .map_err(|e| {
                Error::ProviderUnavailable(format!(
                    "cannot reach the agent of sandbox {id}: {}",
                    e.message()
                ))
            })
    }

    /// Where a running sandbox's agent listens and who must serve it.
    async fn agent_endpoint(&self, id: &SandboxId) -> Result<(std::path::PathBuf, PeerCheck)> {
        let docker = self.docker().await?;
        let c = self.inspect(&docker, id).await?;
        let state = c.state.as_ref();
        if state.and_then(|s| s.paused).unwrap_or(false) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is paused: resume it first"
            )));
        }
        if !state.and_then(|s| s.running).unwrap_or(false) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is not running ({})",
                describe_state(&c)
            )));
        }
        Ok((self.socket_path(id), agent_peer(&c)))
    }

    /// `docker export` of the sandbox's container, streamed: its whole
    /// filesystem as the container sees it, without its bind mounts and
    /// without StacyVM's own files, which the provider puts back at create.
    pub(super) async fn snapshot(&self, id: &SandboxId) -> Result<stacyvm_core::ByteStream> {
        use futures_util::StreamExt;
        let docker = self.docker().await?;
        self.inspect(&docker, id).await?;
        let name = self.container_name(id);
        let stream = docker
            .export_container(&name)
            .map(|chunk| chunk.map_err(std::io::Error::other));
        // The agent and StacyVM's files are copied into the container at
        // create, so the export holds them: left out like on every provider.
        Ok(crate::snapshot::filter_tar(
            Box::pin(stream),
            crate::snapshot::DEFAULT_EXCLUDES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ))
    }

    /// One reading of the Engine's stats of the sandbox's container (a
    /// single sample, not the two-cycle average), with its CPU limit and the
    /// filesystem its merged root lives on from the inspection.
    pub(super) async fn stats(&self, id: &SandboxId) -> Result<crate::RuntimeStats> {
        let docker = self.docker().await?;
        let c = self.inspect(&docker, id).await?;
        let opts = bollard::query_parameters::StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let mut stream = docker.stats(&self.container_name(id), Some(opts));
        let reading = match stream.next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) if is_status(&e, 404) => {
                return Err(Error::NotFound(format!("sandbox {id} has no container")))
            }
            Some(Err(e)) => {
                return Err(self.docker_error(format_args!("reading sandbox {id}'s stats"), e))
            }
            None => {
                return Err(Error::ProviderUnavailable(format!(
                    "the Docker daemon sent no stats for sandbox {id}"
                )))
            }
        };
        let host_cpus = reading
            .cpu_stats
            .as_ref()
            .and_then(|c| c.online_cpus)
            .filter(|n| *n > 0)
            .map_or_else(crate::sandboxing::usage::host_cpus, f64::from);
        let quota = c
            .host_config
            .as_ref()
            .and_then(|h| h.nano_cpus)
            .filter(|n| *n > 0)
            .map(|n| n as f64 / 1e9);
        let mut out = crate::RuntimeStats {
            cpu_count: Some(quota.map_or(host_cpus, |q| q.min(host_cpus))),
            cpu_time_ns: reading
                .cpu_stats
                .as_ref()
                .and_then(|c| c.cpu_usage.as_ref())
                .and_then(|u| u.total_usage),
            ..Default::default()
        };
        if let Some(m) = &reading.memory_stats {
            let stat = |k: &str| {
                m.stats
                    .as_ref()
                    .and_then(|s| s.get(&format!("total_{k}")).or_else(|| s.get(k)).copied())
            };
            if let Some(usage) = m.usage {
                // cgroup v1 names the inactive page cache total_inactive_file,
                // v2 inactive_file; `docker stats` leaves it out too.
                out.mem_used = Some(usage.saturating_sub(stat("inactive_file").unwrap_or(0)));
            }
            out.mem_cache = stat("cache").or_else(|| stat("file"));
            let host_mem = crate::sandboxing::usage::host_memory();
            out.mem_total = match (m.limit.filter(|l| *l > 0), host_mem) {
                (Some(l), Some(h)) => Some(l.min(h)),
                (l, h) => l.or(h),
            };
        }
        let merged = c
            .graph_driver
            .as_ref()
            .and_then(|g| g.data.get("MergedDir"))
            .map(PathBuf::from);
        if let Some(dir) = merged {
            if let Ok(Some((used, total))) =
                tokio::task::spawn_blocking(move || crate::sandboxing::usage::filesystem_use(&dir))
                    .await
            {
                out.disk_used = Some(used);
                out.disk_total = Some(total);
            }
        }
        Ok(out)
    }

    pub(super) async fn pause(&self, id: &SandboxId) -> Result<()> {
        let docker = self.docker().await?;
        let c = self.inspect(&docker, id).await?;
        let state = c.state.as_ref();
        if state.and_then(|s| s.paused).unwrap_or(false) {
            return Err(Error::Conflict(format!("sandbox {id} is already paused")));
        }
        if !state.and_then(|s| s.running).unwrap_or(false) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is not running ({})",
                describe_state(&c)
            )));
        }
        // Marked first so no exec slips in between the freeze and the mark.
        self.paused_set().insert(id.clone());
        if let Err(e) = docker.pause_container(&self.container_name(id)).await {
            self.paused_set().remove(id);
            return Err(self.docker_error(format_args!("pausing sandbox {id}"), e));
        }
        Ok(())
    }

    pub(super) async fn resume(&self, id: &SandboxId) -> Result<()> {
        let docker = self.docker().await?;
        let c = self.inspect(&docker, id).await?;
        let status = c.state.as_ref().and_then(|s| s.status);
        if status != Some(ContainerStateStatusEnum::PAUSED) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is not paused ({})",
                describe_state(&c)
            )));
        }
        docker
            .unpause_container(&self.container_name(id))
            .await
            .map_err(|e| self.docker_error(format_args!("resuming sandbox {id}"), e))?;
        self.paused_set().remove(id);
        Ok(())
    }
}

pub(super) fn with_output(err: Error, output: &str) -> Error {
    if output.is_empty() {
        return err;
    }
    let message = format!("{}; container output:\n{output}", err.message());
    match err {
        Error::InvalidRequest(_) => Error::InvalidRequest(message),
        Error::ProviderUnavailable(_) => Error::ProviderUnavailable(message),
        Error::Timeout(_) => Error::Timeout(message),
        _ => Error::Internal(message),
    }
}

/// Removes a half-made sandbox unless disarmed: awaited on error paths, and
/// from `Drop` (on a spawned task) when the spawn future is abandoned.
pub(super) struct SpawnCleanup {
    target: Option<(Arc<Inner>, SandboxId)>,
}

impl SpawnCleanup {
    pub(super) fn disarm(&mut self) {
        self.target = None;
    }

    pub(super) async fn run(&mut self) {
        if let Some((inner, id)) = self.target.take() {
            if let Err(e) = inner.destroy(&id).await {
                tracing::warn!(sandbox = %id, error = %e, "cleaning up a failed docker spawn failed");
            }
        }
    }
}

impl Drop for SpawnCleanup {
    fn drop(&mut self) {
        if let Some((inner, id)) = self.target.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if let Err(e) = inner.destroy(&id).await {
                        tracing::warn!(sandbox = %id, error = %e, "cleaning up an abandoned docker spawn failed");
                    }
                });
            }
        }
    }
}
