//! Handlers of `/v1/templates`: builds, their versions and logs.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{stream, StreamExt};
use serde::Deserialize;
use stacyvm_api as api;

use super::error::{error_response, ApiResult};
use super::extract::{Auth, JsonBody, Path, Q};
use super::{note, AppState};
use crate::app::templates::view;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VersionQuery {
    /// A version number; the newest when absent.
    pub version: Option<i64>,
}

/// Build a template.
///
/// Records a new version of the caller's tenant's template `name` and answers `202` at once with
/// it in state `building`; the build runs in a sandbox of `from` (a template visible to the
/// caller, `name` or `name:version`, or a catalog image). `steps` run in order: `run` an argv,
/// `write` a file, `upload` a base64 tar into a directory, set `env` or `workdir` for the steps
/// after and for the template's sandboxes. The result is snapshotted into the image catalog as
/// `template/TENANT/NAME:VERSION` and the version becomes `ready`. A failing step makes it
/// `failed` with that step's output, and leaves no sandbox and no image. `cpu`, `memory_mb`, `env`,
/// `workdir`, `start` and `ready` are the defaults of every create from the template; `network`
/// applies to the build only. Follow the build with `GET /v1/templates/{name}/logs`.
#[utoipa::path(post, path = "/v1/templates", tag = "templates",
    request_body = api::CreateTemplate,
    responses((status = 202, body = api::Template, description = "the version, building"),
        (status = 400, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody),
        (status = 429, body = super::error::ErrorBody,
            description = "`quota_exceeded`: a new template over `max_templates`, or a tenant whose \
            volumes and images already fill `max_volume_mb`")))]
pub async fn template_build(
    State(s): State<AppState>,
    Auth(who): Auth,
    JsonBody(body): JsonBody<api::CreateTemplate>,
) -> ApiResult<Response> {
    let name = body.name.clone();
    let v = match s.app.template_build(&who, body).await {
        Ok(v) => v,
        // The audit event of a refused build names the template and why
        // (a quota, an unknown base), not only the status.
        Err(e) => {
            let detail = serde_json::json!({"error": e.code()});
            return Ok(note(error_response(&e), Some(name), detail));
        }
    };
    let view = view(&v);
    let detail = serde_json::json!({"version": view.version, "from": view.from});
    Ok(note(
        (StatusCode::ACCEPTED, Json(view)).into_response(),
        Some(v.name.clone()),
        detail,
    ))
}

/// List templates.
///
/// The newest version of every template the caller sees: its own tenant's, then the operator's
/// (which every tenant may use).
#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, body = api::TemplateList)))]
pub async fn template_list(
    State(s): State<AppState>,
    Auth(who): Auth,
) -> ApiResult<Json<api::TemplateList>> {
    let templates = s.app.template_list(&who).await?;
    Ok(Json(api::TemplateList {
        templates: templates.iter().map(view).collect(),
    }))
}

/// Get a template.
///
/// Its newest version (whatever its state), or the one `version` names. Creates take the newest
/// `ready` version unless they pin one (`"template": "name:version"`). Another tenant's template is
/// `404`.
#[utoipa::path(get, path = "/v1/templates/{name}", tag = "templates", params(VersionQuery),
    responses((status = 200, body = api::Template)))]
pub async fn template_get(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
    Q(q): Q<VersionQuery>,
) -> ApiResult<Json<api::Template>> {
    Ok(Json(view(
        &s.app.template_get(&who, &name, q.version).await?,
    )))
}

/// List a template's versions.
///
/// Every version, oldest first, with its state and defaults.
#[utoipa::path(get, path = "/v1/templates/{name}/versions", tag = "templates",
    responses((status = 200, body = api::TemplateList)))]
pub async fn template_versions(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<api::TemplateList>> {
    let versions = s.app.template_versions(&who, &name).await?;
    Ok(Json(api::TemplateList {
        templates: versions.iter().map(view).collect(),
    }))
}

/// Read a template build's log.
///
/// The log of the newest version (or of `version`). While the build runs the answer is a
/// `text/event-stream`: `log` events (`{"data": "<text>"}`) with the log so far and then as it
/// grows, and a last `end` event with the version's `state` and `failure`. Once the build has
/// ended, the answer is the whole log as JSON.
#[utoipa::path(get, path = "/v1/templates/{name}/logs", tag = "templates", params(VersionQuery),
    responses((status = 200, body = api::TemplateLog)))]
pub async fn template_logs(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
    Q(q): Q<VersionQuery>,
) -> ApiResult<Response> {
    let first = view_log(&s.app.template_get(&who, &name, q.version).await?);
    if first.state != api::TemplateState::Building {
        return Ok(Json(first).into_response());
    }
    let version = Some(first.version);
    let sent = first.log.len();
    let opening = log_event(&first.log);
    let app = s.app.clone();
    let follow = stream::unfold(
        (app, who, name, sent, false),
        move |(app, who, name, sent, done)| async move {
            if done {
                return None;
            }
            tokio::time::sleep(LOG_POLL).await;
            let now = match app.template_get(&who, &name, version).await {
                Ok(v) => view_log(&v),
                // Deleted meanwhile: the stream ends.
                Err(_) => return None,
            };
            let mut events = Vec::new();
            if let Some(fresh) = now.log.get(sent..).filter(|f| !f.is_empty()) {
                events.extend(log_event(fresh));
            }
            let ended = now.state != api::TemplateState::Building;
            if ended {
                events.push(end_event(&now));
            }
            let sent = now.log.len().max(sent);
            Some((stream::iter(events), (app, who, name, sent, ended)))
        },
    )
    .flatten();
    let events = stream::iter(opening).chain(follow).map(Ok::<_, Infallible>);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// How often a log follower reads the log again.
const LOG_POLL: Duration = Duration::from_millis(300);

fn view_log(v: &crate::app::templates::VersionRow) -> api::TemplateLog {
    let t = view(v);
    api::TemplateLog {
        name: t.name,
        version: t.version,
        state: t.state,
        failure: t.failure,
        log: v.log.clone(),
    }
}

fn log_event(text: &str) -> Option<Event> {
    (!text.is_empty()).then(|| {
        Event::default()
            .event("log")
            .json_data(serde_json::json!({"data": text}))
            .unwrap_or_default()
    })
}

fn end_event(log: &api::TemplateLog) -> Event {
    Event::default()
        .event("end")
        .json_data(serde_json::json!({"name": log.name, "version": log.version,
            "state": log.state, "failure": log.failure}))
        .unwrap_or_default()
}

/// Delete a template.
///
/// Every version of the caller's tenant's template. Sandboxes already running from it keep
/// running with their files; its images are removed once no sandbox uses them. The operator's
/// templates may be used by every tenant but deleted only by the operator (`403`).
#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates",
    responses((status = 204, description = "deleted")))]
pub async fn template_delete(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let deleted = s.app.template_delete(&who, &name).await?;
    let versions: Vec<i64> = deleted.iter().map(|v| v.version).collect();
    Ok(note(
        StatusCode::NO_CONTENT.into_response(),
        Some(name),
        serde_json::json!({"versions": versions}),
    ))
}
