//! The StacyVM client: sandboxes, images, templates, tenants, keys, quotas, audit, status and workers.

import type {
  ApiKey,
  AuditEvent,
  CreateSandbox,
  CreateTemplate,
  Image,
  Operations,
  Quota,
  Role,
  Sandbox as SandboxInfo,
  SandboxState,
  Status,
  Template,
  TemplateLog,
  Tenant,
  Volume,
  WhoAmI,
  Worker,
  WorkerToken,
} from "./generated/api.js";
import { ProviderUnavailableError, StacyVMError } from "./errors.js";
import { type CallOptions, type ClientOptions, Transport } from "./http.js";
import { LocalFile, type Upload } from "./body.js";
import { Sandbox } from "./sandbox.js";
import { TemplateBuildFailedError, TemplateLogStream } from "./templates.js";

/** One page of a list; pass `nextCursor` back as `cursor` for the next (`null`: this was the last). */
export interface Page<T> {
  items: T[];
  nextCursor: string | null;
}

/** What `client.sandbox()` takes: the API's create fields, plus the call's own options. */
export type SandboxOptions = CreateSandbox &
  CallOptions & {
    /** A repeated create with the same key returns the first sandbox; such a create is also retried. */
    idempotencyKey?: string;
    /** How long to wait for the sandbox to run, in milliseconds, beyond the client's timeout. */
    requestTimeoutMs?: number;
  };

/** What `buildTemplate` takes: the API's build fields, plus waiting for the build. */
export type BuildTemplateOptions = CreateTemplate &
  CallOptions & {
    /** Follow the build to its end: resolve to the ready version, or throw `TemplateBuildFailedError`. */
    wait?: boolean;
    /** With `wait`, receives each piece of the build's log as it is written. */
    onLog?: (text: string) => void;
  };

/** Filters of `listSandboxes`. */
export interface SandboxListOptions {
  state?: SandboxState;
  /** Only sandboxes carrying all these labels. */
  labels?: Record<string, string>;
  limit?: number;
  cursor?: string;
}

/** Filters of `listAudit`; `since` is an RFC 3339 time. */
export type AuditListOptions = Operations["audit_list"]["query"];

/** What `/readyz` says: ready, or why not. */
export interface Readiness {
  ready: boolean;
  detail: string;
}

function page<T>(items: T[] | undefined, next: string | null | undefined): Page<T> {
  return { items: items ?? [], nextCursor: next ?? null };
}

/**
 * The StacyVM client. `url` and `apiKey` default to `STACYVM_URL` and
 * `STACYVM_API_KEY`. Idempotent calls are retried on 503, 429
 * `rate_limited` and failed connections (see `RetryOptions`).
 */
export class Client {
  private readonly t: Transport;

  constructor(options: ClientOptions = {}) {
    this.t = new Transport(options);
  }

  /** The server's base URL. */
  get url(): string {
    return this.t.url;
  }

  // sandboxes

  /**
   * Creates a sandbox and resolves once it runs commands:
   * `await using sb = await client.sandbox({ image: "busybox" })`.
   */
  async sandbox(options: SandboxOptions): Promise<Sandbox> {
    const { idempotencyKey, requestTimeoutMs, signal, ...spec } = options;
    if (!spec.image && !spec.template) throw new TypeError("give an image or a template");
    const r = await this.t.send("sandbox_create", {
      json: spec,
      headers: idempotencyKey ? { "Idempotency-Key": idempotencyKey } : {},
      idempotent: idempotencyKey !== undefined,
      deadline: { extraMs: requestTimeoutMs ?? 0 },
      signal,
    });
    return new Sandbox(this.t, (await r.json()) as SandboxInfo);
  }

  /** A handle on an existing sandbox. */
  async getSandbox(id: string): Promise<Sandbox> {
    const r = await this.t.send("sandbox_get", { path: { id } });
    return new Sandbox(this.t, (await r.json()) as SandboxInfo);
  }

  /** One page of the caller's sandboxes (an admin's: every tenant's). */
  async listSandboxes(options: SandboxListOptions = {}): Promise<Page<SandboxInfo>> {
    const labels = Object.entries(options.labels ?? {}).map(([k, v]) => `${k}=${v}`);
    const r = await this.t.send("sandbox_list", {
      query: { state: options.state, label: labels, limit: options.limit, cursor: options.cursor },
    });
    const d = (await r.json()) as Operations["sandbox_list"]["response"];
    return page(d.sandboxes, d.next_cursor);
  }

  /** Every sandbox the filters match, page after page. */
  async *sandboxes(options: Omit<SandboxListOptions, "cursor"> = {}): AsyncGenerator<SandboxInfo, void, undefined> {
    let cursor: string | undefined;
    do {
      const p = await this.listSandboxes({ ...options, cursor });
      yield* p.items;
      cursor = p.nextCursor ?? undefined;
    } while (cursor !== undefined);
  }

  /** Destroys a sandbox by id; repeating it is harmless. */
  async destroySandbox(id: string): Promise<void> {
    await this.t.send("sandbox_destroy", { path: { id } });
  }

  // images

  /**
   * Imports a root filesystem tar into the catalog as `name`, streamed:
   * bytes, a stream, an iterable of chunks, or a local file as
   * `{ localPath }`. Admin only.
   */
  async importImage(name: string, tar: Upload | { localPath: string }, options: CallOptions = {}): Promise<Image> {
    const body = typeof tar === "object" && tar !== null && "localPath" in tar ? new LocalFile(tar.localPath) : tar;
    const r = await this.t.send("image_import", {
      query: { name },
      body,
      deadline: "none",
      transfer: true,
      signal: options.signal,
    });
    return (await r.json()) as Image;
  }

  async listImages(): Promise<Image[]> {
    const r = await this.t.send("image_list", {});
    return ((await r.json()) as Operations["image_list"]["response"]).images;
  }

  async getImage(name: string): Promise<Image> {
    const r = await this.t.send("image_get", { path: { name } });
    return (await r.json()) as Image;
  }

  async deleteImage(name: string): Promise<void> {
    await this.t.send("image_delete", { path: { name } });
  }

  // templates

  /**
   * Builds a new version of the caller's tenant's template `name` from
   * `from` (a catalog image, or a visible template `name` or
   * `name:version`) by running `steps` in a sandbox. `cpu`, `memory_mb`,
   * `env`, `workdir`, `start` (run in the background in every sandbox of
   * the template) and `ready` (a create resolves once it exits 0) are the
   * template's create defaults; `network` and `provider` apply to the build
   * only. Resolves to the new version, `building`; with `wait`, follows the
   * build to its end (handing its log to `onLog`) and resolves to the
   * ready version or throws `TemplateBuildFailedError`.
   */
  async buildTemplate(options: BuildTemplateOptions): Promise<Template> {
    const { wait, onLog, signal, ...spec } = options;
    const r = await this.t.send("template_build", { json: spec, signal });
    const t = (await r.json()) as Template;
    if (!wait) return t;
    return await this.waitTemplate(t.name, { version: t.version, onLog, signal });
  }

  /**
   * Follows the build of `version` (default the newest) to its end, handing
   * each piece of its log to `onLog`; resolves to the ready version or
   * throws `TemplateBuildFailedError` with the failing step's output.
   */
  async waitTemplate(
    name: string,
    options: { version?: number; onLog?: (text: string) => void } & CallOptions = {},
  ): Promise<Template> {
    const log = await this.templateLogs(name, options);
    for await (const text of log) options.onLog?.(text);
    const t = await this.getTemplate(name, { version: log.end?.version ?? options.version });
    if (t.state === "failed") throw new TemplateBuildFailedError(t);
    return t;
  }

  /** The build log of `version` (default the newest): followed while the build runs, whole once it has ended. */
  async templateLogs(name: string, options: { version?: number } & CallOptions = {}): Promise<TemplateLogStream> {
    const r = await this.t.send("template_logs", {
      path: { name },
      query: { version: options.version },
      accept: "text/event-stream, application/json",
      deadline: "headers",
      signal: options.signal,
    });
    if ((r.headers.get("content-type") ?? "").startsWith("text/event-stream")) {
      if (r.body === null) throw new ProviderUnavailableError("provider_unavailable", "the build log stream has no body");
      return new TemplateLogStream(r.body);
    }
    return new TemplateLogStream((await r.json()) as TemplateLog);
  }

  /** The newest version of every template the caller sees: its tenant's and the operator's (the public catalog). */
  async listTemplates(): Promise<Template[]> {
    const r = await this.t.send("template_list", {});
    return ((await r.json()) as Operations["template_list"]["response"]).templates;
  }

  /** The newest version of `name` (whatever its state), or `version`. */
  async getTemplate(name: string, options: { version?: number } = {}): Promise<Template> {
    const r = await this.t.send("template_get", { path: { name }, query: { version: options.version } });
    return (await r.json()) as Template;
  }

  /** Every version of `name`, oldest first. */
  async listTemplateVersions(name: string): Promise<Template[]> {
    const r = await this.t.send("template_versions", { path: { name } });
    return ((await r.json()) as Operations["template_versions"]["response"]).templates;
  }

  /**
   * Deletes every version of the caller's tenant's template `name`;
   * sandboxes running from it keep running. The operator's templates are a
   * `ForbiddenError` to other tenants.
   */
  async deleteTemplate(name: string): Promise<void> {
    await this.t.send("template_delete", { path: { name } });
  }

  // volumes

  /**
   * Creates a volume of the caller's tenant: a filesystem of `sizeMb` MiB
   * (at least 8) that outlives the sandboxes it is mounted into. Mount it
   * with `client.sandbox({ image, volumes: [{ volume: name, path: "/data" }] })`.
   */
  async createVolume(name: string, sizeMb: number): Promise<Volume> {
    const r = await this.t.send("volume_create", { json: { name, size_mb: sizeMb } });
    return (await r.json()) as Volume;
  }

  async listVolumes(): Promise<Volume[]> {
    const r = await this.t.send("volume_list", {});
    return ((await r.json()) as Operations["volume_list"]["response"]).volumes;
  }

  async getVolume(name: string): Promise<Volume> {
    const r = await this.t.send("volume_get", { path: { name } });
    return (await r.json()) as Volume;
  }

  /** Deletes a volume and its data; a `ConflictError` while a live sandbox mounts it. */
  async deleteVolume(name: string): Promise<void> {
    await this.t.send("volume_delete", { path: { name } });
  }

  // tenants, quotas, keys

  async createTenant(name: string): Promise<Tenant> {
    const r = await this.t.send("tenant_create", { json: { name } });
    return (await r.json()) as Tenant;
  }

  async listTenants(options: { limit?: number; cursor?: string } = {}): Promise<Page<Tenant>> {
    const r = await this.t.send("tenant_list", { query: options });
    const d = (await r.json()) as Operations["tenant_list"]["response"];
    return page(d.tenants, d.next_cursor);
  }

  async getQuota(tenantId: string): Promise<Quota> {
    const r = await this.t.send("quota_get", { path: { id: tenantId } });
    return (await r.json()) as Quota;
  }

  /** Replaces the tenant's quota (a missing or `null` field is unlimited); returns the quota in force. */
  async setQuota(tenantId: string, quota: Quota): Promise<Quota> {
    const r = await this.t.send("quota_set", { path: { id: tenantId }, json: quota });
    return (await r.json()) as Quota;
  }

  /**
   * Issues a key (`admin` on the operator's tenant only, `owner`, `member`
   * or `viewer`); its secret is in `key` of the answer, and only there.
   */
  async createKey(tenantId: string, role: Role, name: string): Promise<ApiKey> {
    const r = await this.t.send("key_create", { json: { tenant_id: tenantId, role, name } });
    return (await r.json()) as ApiKey;
  }

  async listKeys(options: { limit?: number; cursor?: string } = {}): Promise<Page<ApiKey>> {
    const r = await this.t.send("key_list", { query: options });
    const d = (await r.json()) as Operations["key_list"]["response"];
    return page(d.keys, d.next_cursor);
  }

  /** Revokes a key: it is refused from then on. */
  async revokeKey(id: string): Promise<void> {
    await this.t.send("key_revoke", { path: { id } });
  }

  // audit, status, workers

  /** One page of audit events. */
  async listAudit(options: AuditListOptions = {}): Promise<Page<AuditEvent>> {
    const r = await this.t.send("audit_list", { query: options });
    const d = (await r.json()) as Operations["audit_list"]["response"];
    return page(d.events, d.next_cursor);
  }

  /** The key this client calls with: its id, tenant and role (any valid key may ask). */
  async whoami(): Promise<WhoAmI> {
    const r = await this.t.send("whoami", {});
    return (await r.json()) as WhoAmI;
  }

  /** The server's status: version, mode, store, providers, workers, sandbox counts. */
  async status(): Promise<Status> {
    const r = await this.t.send("status", {});
    return (await r.json()) as Status;
  }

  async listWorkers(): Promise<Worker[]> {
    const r = await this.t.send("worker_list", {});
    return ((await r.json()) as Operations["worker_list"]["response"]).workers;
  }

  async getWorker(id: string): Promise<Worker> {
    const r = await this.t.send("worker_get", { path: { id } });
    return (await r.json()) as Worker;
  }

  /** Sends no new sandboxes to the worker; it keeps the ones it has. */
  async drainWorker(id: string): Promise<Worker> {
    const r = await this.t.send("worker_drain", { path: { id } });
    return (await r.json()) as Worker;
  }

  async undrainWorker(id: string): Promise<Worker> {
    const r = await this.t.send("worker_undrain", { path: { id } });
    return (await r.json()) as Worker;
  }

  /** Issues a worker token; its secret is in `token` of the answer, and only there. */
  async createWorkerToken(name: string): Promise<WorkerToken> {
    const r = await this.t.send("worker_token_create", { json: { name } });
    return (await r.json()) as WorkerToken;
  }

  async listWorkerTokens(): Promise<WorkerToken[]> {
    const r = await this.t.send("worker_token_list", {});
    return ((await r.json()) as Operations["worker_token_list"]["response"]).tokens;
  }

  async revokeWorkerToken(id: string): Promise<void> {
    await this.t.send("worker_token_revoke", { path: { id } });
  }

  /** True while the server serves (`/healthz`). */
  async health(): Promise<boolean> {
    const r = await this.t.send("healthz", {});
    return ((await r.json()) as { status?: string }).status === "ok";
  }

  /** Whether the store and at least one provider are usable (`/readyz`). */
  async ready(): Promise<Readiness> {
    try {
      const r = await this.t.send("readyz", { idempotent: false });
      return { ready: true, detail: ((await r.json()) as { status?: string }).status ?? "ready" };
    } catch (e) {
      if (e instanceof StacyVMError && e.status === 503) return { ready: false, detail: e.message };
      throw e;
    }
  }

  /** The Prometheus metrics text. */
  async metrics(): Promise<string> {
    const r = await this.t.send("metrics", { accept: "text/plain" });
    return await r.text();
  }
}
