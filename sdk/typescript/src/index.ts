//! The `stacyvm` package: a typed client for the StacyVM API.

export { Client, type Page, type BuildTemplateOptions, type SandboxOptions, type SandboxListOptions, type AuditListOptions, type Readiness } from "./client.js";
export {
  Sandbox,
  Files,
  ExecStream,
  LogStream,
  modeString,
  type Command,
  type ExecOptions,
  type ExecResult,
  type ExecEvent,
  type OutputEvent,
  type ExitEvent,
  type Mode,
} from "./sandbox.js";
export {
  Processes,
  ProcessOutput,
  type ProcessEvent,
  type ProcessExitEvent,
  type ProcessStartOptions,
} from "./processes.js";
export { Pty, type PtyOptions } from "./pty.js";
export { TemplateLogStream, TemplateBuildFailedError, type TemplateLogEnd } from "./templates.js";
export {
  DEFAULT_URL,
  DEFAULT_TIMEOUT_MS,
  VERSION,
  type ClientOptions,
  type CallOptions,
  type RetryOptions,
  type RetryInfo,
} from "./http.js";
export { type Upload } from "./body.js";
export { SSEDecoder, type SSEEvent } from "./sse.js";
export * from "./errors.js";
// The API's shapes, as the server's OpenAPI document declares them. The
// document's `Sandbox` (a sandbox's description) is `SandboxInfo` here:
// `Sandbox` is the handle.
export type {
  Actor,
  ApiKey,
  ArchiveSummary,
  AuditEvent,
  CreateSandbox,
  CreateTemplate,
  ExecRequest,
  ExecResponse,
  ExitStatus,
  ExposedPort,
  Failure,
  FileEntry,
  FileType,
  Image,
  LogLine,
  Network,
  PoolStatus,
  PortToken,
  Process,
  ProcessList,
  ProcessStart,
  ProviderStatus,
  Quota,
  Role,
  Sandbox as SandboxInfo,
  SandboxState,
  Status,
  StdinWritten,
  StoreStatus,
  Template,
  TemplateList,
  TemplateLog,
  TemplateState,
  TemplateStep,
  Tenant,
  UploadStep,
  Volume,
  VolumeMount,
  WhoAmI,
  Worker,
  WorkerCapacity,
  WorkerProvider,
  WorkerToken,
  WriteStep,
  Operations,
  OperationId,
  OperationRoute,
} from "./generated/api.js";
export { operations, SandboxStateValues, FileTypeValues, RoleValues, NetworkValues, TemplateStateValues } from "./generated/api.js";
