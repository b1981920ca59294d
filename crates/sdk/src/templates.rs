//! Templates: builds, their versions and their logs.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use reqwest::Method;

use crate::client::{Deadline, Retry};
use crate::models::*;
use crate::{sse, Client, Error, Result};

/// What a build log reader yields.
#[derive(Clone, Debug, PartialEq)]
pub enum TemplateLogEvent {
    /// More of the log.
    Log(String),
    /// The build has ended (always the last event).
    End {
        state: TemplateState,
        failure: Option<String>,
    },
}

/// A build's log: the whole log of an ended build, or a running build's
/// log as it grows.
pub type TemplateLogStream = Pin<Box<dyn Stream<Item = Result<TemplateLogEvent>> + Send>>;

#[derive(serde::Deserialize)]
struct LogChunk {
    data: String,
}

#[derive(serde::Deserialize)]
struct LogEnd {
    state: TemplateState,
    failure: Option<String>,
}

impl Client {
    /// `POST /v1/templates`: starts a build; the answer is the new version,
    /// `building`.
    pub async fn template_build(&self, spec: &CreateTemplate) -> Result<Template> {
        let url = self.url(&["v1", "templates"], &[])?;
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(spec))
        })
        .await
    }

    /// `GET /v1/templates`: the newest version of every visible template.
    pub async fn template_list(&self) -> Result<Vec<Template>> {
        let url = self.url(&["v1", "templates"], &[])?;
        let r: TemplateList = self
            .send_json(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(r.templates)
    }

    /// `GET /v1/templates/{name}`: the newest version, or `version`.
    pub async fn template_get(&self, name: &str, version: Option<i64>) -> Result<Template> {
        let query: Vec<(&str, String)> = version
            .map(|v| ("version", v.to_string()))
            .into_iter()
            .collect();
        let url = self.url(&["v1", "templates", name], &query)?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// `GET /v1/templates/{name}/versions`: every version, oldest first.
    pub async fn template_versions(&self, name: &str) -> Result<Vec<Template>> {
        let url = self.url(&["v1", "templates", name, "versions"], &[])?;
        let r: TemplateList = self
            .send_json(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(r.templates)
    }

    /// `DELETE /v1/templates/{name}`: every version; sandboxes running
    /// from it keep running.
    pub async fn template_delete(&self, name: &str) -> Result<()> {
        let url = self.url(&["v1", "templates", name], &[])?;
        self.send(Retry::Idempotent, || {
            Ok(self.request(Method::DELETE, url.clone(), Deadline::Default))
        })
        .await?;
        Ok(())
    }

    /// `GET /v1/templates/{name}/logs`: the log of the newest version (or
    /// `version`), followed while the build runs, and how it ended.
    pub async fn template_logs(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<TemplateLogStream> {
        let query: Vec<(&str, String)> = version
            .map(|v| ("version", v.to_string()))
            .into_iter()
            .collect();
        let url = self.url(&["v1", "templates", name, "logs"], &query)?;
        let resp = self
            .send(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Streaming))
            })
            .await?;
        let streaming = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"));
        if !streaming {
            let log: TemplateLog = crate::client::decode(resp).await?;
            let events = vec![
                Ok(TemplateLogEvent::Log(log.log)),
                Ok(TemplateLogEvent::End {
                    state: log.state,
                    failure: log.failure,
                }),
            ];
            return Ok(Box::pin(futures_util::stream::iter(events)));
        }
        let client = self.clone();
        let events = sse::events(Box::pin(resp.bytes_stream()));
        // Stops after the end event; a body that ends before it is reported.
        let stream =
            futures_util::stream::unfold((Box::pin(events), false), move |(mut events, done)| {
                let client = client.clone();
                async move {
                    if done {
                        return None;
                    }
                    loop {
                        let item = match events.next().await {
                            None => Err(Error::Protocol(
                                "the build log stream ended before the build did".into(),
                            )),
                            Some(Err(e)) => Err(client.transport(e)),
                            Some(Ok(ev)) => match ev.event.as_str() {
                                "log" => serde_json::from_str::<LogChunk>(&ev.data)
                                    .map(|c| TemplateLogEvent::Log(c.data))
                                    .map_err(|e| Error::Protocol(format!("a log event: {e}"))),
                                "end" => serde_json::from_str::<LogEnd>(&ev.data)
                                    .map(|e| TemplateLogEvent::End {
                                        state: e.state,
                                        failure: e.failure,
                                    })
                                    .map_err(|e| Error::Protocol(format!("the end event: {e}"))),
                                _ => continue,
                            },
                        };
                        let last = !matches!(item, Ok(TemplateLogEvent::Log(_)));
                        return Some((item, (events, last)));
                    }
                }
            });
        Ok(Box::pin(stream))
    }
}
