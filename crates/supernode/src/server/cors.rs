//! CORS, off unless `serve --cors-origins` names the origins (or `*`) that web pages may call
//! the server from. A request from an allowed origin gets `Access-Control-Allow-Origin` (and
//! `Vary: Origin`); a preflight (`OPTIONS` with `Access-Control-Request-Method`) from one is
//! answered 204 here, before the API key check, with the methods and headers allowed. A
//! disallowed origin gets no CORS headers at all, so the browser keeps its page out.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The origins allowed.
#[derive(Clone, Debug, PartialEq)]
pub enum Cors {
    Any,
    Origins(Vec<String>),
}

/// Headers a browser may send when none are asked for in a preflight.
const DEFAULT_HEADERS: &str = "authorization, content-type, x-api-key, anthropic-version";

impl Cors {
    /// Parses `--cors-origins`: `*`, or origins (`scheme://host[:port]`) separated by commas.
    pub fn parse(arg: &str) -> Result<Cors, String> {
        let items: Vec<&str> = arg.split(',').map(str::trim).collect();
        if items.contains(&"*") {
            return if items.len() == 1 {
                Ok(Cors::Any)
            } else {
                Err("--cors-origins: `*` cannot be combined with other origins".into())
            };
        }
        let mut out = Vec::new();
        for o in items {
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            match rest {
                Some(host) if !host.is_empty() && !host.contains('/') => {
                    out.push(o.to_ascii_lowercase())
                }
                _ => {
                    return Err(format!(
                    "--cors-origins: `{o}` is not an origin (scheme://host[:port], no path) or `*`"
                ))
                }
            }
        }
        Ok(Cors::Origins(out))
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, if it is allowed.
    fn allow(&self, origin: &str) -> Option<HeaderValue> {
        match self {
            Cors::Any => Some(HeaderValue::from_static("*")),
            Cors::Origins(list) => list
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin))
                .then(|| HeaderValue::from_str(origin).ok())
                .flatten(),
        }
    }
}

pub async fn layer(State(cors): State<std::sync::Arc<Cors>>, req: Request, next: Next) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(allow) = origin.as_deref().and_then(|o| cors.allow(o)) else {
        return next.run(req).await;
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        let asked = req
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or(HeaderValue::from_static(DEFAULT_HEADERS));
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        r
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_parsed_and_matched() {
        assert_eq!(Cors::parse("*").unwrap(), Cors::Any);
        let c = Cors::parse("https://a.example, http://localhost:3000").unwrap();
        assert_eq!(
            c,
            Cors::Origins(vec![
                "https://a.example".into(),
                "http://localhost:3000".into()
            ])
        );
        assert_eq!(c.allow("https://a.example").unwrap(), "https://a.example");
        assert_eq!(
            c.allow("http://localhost:3000").unwrap(),
            "http://localhost:3000"
        );
        assert!(c.allow("https://b.example").is_none());
        assert!(c.allow("http://localhost:3001").is_none());
        assert_eq!(Cors::Any.allow("https://x.example").unwrap(), "*");
        for bad in [
            "",
            "a.example",
            "https://a.example/path",
            "*,https://a.example",
            "ftp://x",
        ] {
            assert!(Cors::parse(bad).is_err(), "{bad}");
        }
    }
}
