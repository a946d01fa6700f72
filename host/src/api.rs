//! The hub's HTTPS API for modules, as edgeHub serves it: direct method
//! calls between local identities, offline too:
//! `POST /twins/{deviceId}/methods` and
//! `POST /twins/{deviceId}/modules/{moduleId}/methods`.
//!
//! Owns the listener, the caller's authentication (a module of this edge:
//! its SAS token in `Authorization`, its id in `x-ms-edge-moduleId:
//! {edge}/{module}`, checked by `auth` as a CONNECT would be) and the
//! request's checks; the call itself is `methods`'. Built on axum over hyper,
//! behind the TLS listener's certificate.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::auth::{sas, Auth, ClientCredentials, Principal};
use crate::methods::{self, Methods};
use crate::protocol::{MethodRequest, MethodResponse};

/// The largest request body (a payload of 128 KiB and its envelope).
const MAX_BODY: usize = methods::MAX_PAYLOAD + 4096;
/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ApiContext {
    pub auth: Arc<Auth>,
    pub methods: Arc<Methods>,
}

/// Serves the API on `listener` until `shutdown`; a connection still open
/// then is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    ctx: Arc<ApiContext>,
    shutdown: CancellationToken,
) {
    let app = router(ctx);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "API listener could not accept a connection");
                    continue;
                }
            },
        };
        let (tls, app, shutdown) = (tls.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "API TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "API TLS handshake timed out"),
            };
            let service = TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                served = conn => if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "API connection ended with an error");
                },
            }
        });
    }
}

fn router(ctx: Arc<ApiContext>) -> Router {
    Router::new()
        .route("/twins/{device}/methods", post(device_call))
        .route(
            "/twins/{device}/modules/{module}/methods",
            post(module_call),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ctx)
}

async fn device_call(
    State(ctx): State<Arc<ApiContext>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    call(&ctx, device, &headers, &body).await
}

async fn module_call(
    State(ctx): State<Arc<ApiContext>>,
    Path((device, module)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    call(&ctx, format!("{device}/{module}"), &headers, &body).await
}

async fn call(ctx: &ApiContext, target: String, headers: &HeaderMap, body: &[u8]) -> Response {
    let caller = match caller(&ctx.auth, headers) {
        Ok(c) => c,
        Err(why) => {
            tracing::warn!(%target, reason = %why, "method call refused: caller not authenticated");
            return error(StatusCode::UNAUTHORIZED, why);
        }
    };
    let request = serde_json::from_slice::<MethodRequest>(body)
        .map_err(|e| format!("the body is not a method request: {e}"))
        .and_then(|r| r.check().map(|()| r));
    let request = match request {
        Ok(r) => r,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let Some(name) = request.method_name.as_deref() else {
        return error(StatusCode::BAD_REQUEST, "methodName is missing".into());
    };
    tracing::debug!(%caller, %target, method = name, "method call");
    let outcome = ctx
        .methods
        .invoke(
            &target,
            name,
            &request.payload,
            request.response_timeout(),
            request.connect_timeout(),
        )
        .await;
    if outcome.answered {
        let answer = MethodResponse {
            status: outcome.status,
            payload: outcome.payload,
        };
        return (StatusCode::OK, Json(answer)).into_response();
    }
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(outcome.payload)).into_response()
}

/// The module calling, from its SAS token and `x-ms-edge-moduleId`.
fn caller(auth: &Auth, headers: &HeaderMap) -> Result<String, String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("no {name} header"))
    };
    let id = header("x-ms-edge-moduleId")?;
    let token = header("authorization")?;
    let Some((device, module)) = id.split_once('/') else {
        return Err(format!(
            "x-ms-edge-moduleId {id:?} is not {{device}}/{{module}}"
        ));
    };
    let parsed = sas::parse_token(token).map_err(|e| e.to_string())?;
    let hub = parsed
        .resource
        .split_once("/devices/")
        .map(|(hub, _)| hub)
        .ok_or_else(|| format!("the token is for {}, not a module", parsed.resource))?;
    let username = format!("{hub}/{device}/{module}/?api-version=2019-10-01");
    let creds = ClientCredentials {
        username: Some(&username),
        password: Some(token),
        certificates: &[],
    };
    match auth.authenticate(id, creds) {
        Ok(Principal::Identity(..)) => Ok(id.to_string()),
        Ok(_) => Err("no device scope yet: callers cannot be authenticated".into()),
        Err(refusal) => Err(format!("{refusal:?}")),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "message": message }))).into_response()
}
