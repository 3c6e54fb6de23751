//! `GET /api/v1/openapi.json`: the OpenAPI 3 description of the REST API, a hand-written
//! file (`openapi.json` beside this module) embedded at build time. It is served without
//! authentication, so that clients and tools can discover the API; the end-to-end suite
//! runs schemathesis against a live coordinator with it, which keeps it honest.

use axum::http::header;
use axum::response::IntoResponse;

/// The description, as served.
pub const SPEC: &str = include_str!("openapi.json");

pub async fn spec() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], SPEC)
}

#[cfg(test)]
mod tests {
    use super::SPEC;

    #[test]
    fn the_description_is_openapi_3_json_with_every_route() {
        let doc: serde_json::Value = serde_json::from_str(SPEC).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        for path in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/api/v1/openapi.json",
            "/api/v1/tasks",
            "/api/v1/tasks/{id}",
            "/api/v1/tasks/{id}/events",
            "/api/v1/tasks/{id}/cancel",
            "/api/v1/tasks/{id}/retry",
            "/api/v1/tasks/{id}/approve",
            "/api/v1/tasks/{id}/reject",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} is not described");
        }
        // Every `$ref` points at a schema that exists.
        let text = SPEC.to_string();
        for part in text.split("\"$ref\": \"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap();
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "missing schema {name}"
            );
        }
    }
}
