//! What a Messages request may ask of the model API beyond tokens.
//!
//! Server tools make the model API itself act for the run: `web_search` and `web_fetch`
//! reach URLs of the agent's choosing, `code_execution` runs code in Anthropic's
//! containers, and the MCP connector (`mcp_servers`) connects to any server by URL. All
//! of it happens off the sandbox's network allow-list, with the worker's key, and is
//! billed per use beyond the tokens the proxy's meter prices. So the model proxy forwards
//! only calls whose tools the agent executes itself, and refuses the rest with a clear
//! error; it also drops the beta flags that switch those features on.
//!
//! Source: Anthropic's Messages API reference ("Tool use": client tools have no `type`
//! or `"custom"`, Anthropic-defined client tools are `bash_*`, `text_editor_*`,
//! `computer_*`, `memory_*`; server tools are `web_search_*`, `web_fetch_*`,
//! `code_execution_*`; "MCP connector": `mcp_servers` under the `mcp-client-*` beta;
//! "Agent Skills"/containers: `container`).

use serde_json::Value;

/// Tool `type`s (by prefix) that the client runs: the model only asks for them.
const CLIENT_TOOL_PREFIXES: &[&str] = &["custom", "bash_", "text_editor_", "computer_", "memory_"];

/// Request fields that make the model API act on its own.
const SERVER_FIELDS: &[&str] = &["mcp_servers", "container"];

/// `anthropic-beta` flags (by prefix) that switch server-side actions on.
const SERVER_BETA_PREFIXES: &[&str] = &[
    "mcp-client-",
    "web-fetch-",
    "web-search-",
    "code-execution-",
    "files-api-",
    "skills-",
];

/// Why a Messages request body must not be forwarded, or `None` if it may be.
///
/// A body that is not a JSON object is refused too: the model API would refuse it, and
/// a body the proxy cannot read is one it cannot vouch for.
pub fn refusal(body: &[u8]) -> Option<String> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Some("the request body is not a JSON object".to_string()),
    };
    if let Err(e) = serde_json::from_slice::<UniqueKeys>(body) {
        return Some(format!(
            "the request body cannot be vouched for: {e} (read here one way, it could be \
             read another by the model API)"
        ));
    }
    let mut asked: Vec<String> = SERVER_FIELDS
        .iter()
        .filter(|f| request.get(**f).is_some_and(|v| !v.is_null()))
        .map(|f| (*f).to_string())
        .collect();
    if let Some(tools) = request.get("tools").and_then(Value::as_array) {
        for tool in tools {
            match tool.get("type") {
                None | Some(Value::Null) => {}
                Some(Value::String(t)) if is_client_tool(t) => {}
                Some(Value::String(t)) => asked.push(format!("the {t} tool")),
                Some(other) => asked.push(format!("a tool of type {other}")),
            }
        }
    }
    let fetched = url_sources(&request);
    if fetched > 0 {
        asked.push(format!(
            "{fetched} content block{} the model API would fetch by URL",
            if fetched == 1 { "" } else { "s" }
        ));
    }
    if asked.is_empty() {
        return None;
    }
    Some(format!(
        "the worker's model proxy does not forward server-side tools ({}): they would \
         reach the network past this run's allow-list and cost beyond its metered tokens",
        asked.join(", ")
    ))
}

/// A JSON document none of whose objects names a key twice. JSON leaves the meaning of
/// duplicate keys to the reader (RFC 8259, section 4: "the names within an object SHOULD be
/// unique"); `serde_json` keeps the last, another parser may keep the first, so a body
/// with one would be checked here as other than what the model API acts on.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        use serde::de::Error;
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(A::Error::custom(format!("the key {key:?} is given twice")));
            }
            map.next_value::<UniqueKeys>()?;
        }
        Ok(UniqueKeys)
    }
}

/// Content blocks anywhere in the request whose `source` is `{"type": "url", …}`: an
/// image or document the model API downloads itself (Messages API, "Vision" and "PDF
/// support": URL sources), off the allow-list, with a URL that can carry the run's data.
fn url_sources(value: &Value) -> usize {
    match value {
        Value::Object(fields) => {
            let here = fields
                .get("source")
                .and_then(|s| s.get("type"))
                .and_then(Value::as_str)
                .is_some_and(|t| t.eq_ignore_ascii_case("url"));
            usize::from(here) + fields.values().map(url_sources).sum::<usize>()
        }
        Value::Array(items) => items.iter().map(url_sources).sum(),
        _ => 0,
    }
}

fn is_client_tool(kind: &str) -> bool {
    CLIENT_TOOL_PREFIXES.iter().any(|p| kind.starts_with(p))
}

/// An `anthropic-beta` header value without the flags of server-side features, or
/// `None` when nothing is left.
pub fn client_betas(value: &str) -> Option<String> {
    let kept: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .filter(|b| {
            let b = b.to_ascii_lowercase();
            !SERVER_BETA_PREFIXES.iter().any(|p| b.starts_with(p))
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key given twice (`tools` once with a server tool, once empty) could be read one
    /// way here and the other by the model API: refused. Before, the last was checked.
    #[test]
    fn a_key_given_twice_is_refused() {
        let twice = br#"{"model":"m","messages":[],
            "tools":[{"type":"web_fetch_20250910","name":"web_fetch"}],"tools":[]}"#;
        let why = refusal(twice).expect("refused");
        assert!(why.contains("twice"), "{why}");
        let nested = br#"{"messages":[{"role":"user","content":"a","content":"b"}]}"#;
        assert!(refusal(nested).is_some());
        let fine = br#"{"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}]}"#;
        assert_eq!(refusal(fine), None);
    }

    /// An image or document by URL is fetched by the model API itself: refused, as is
    /// a server-side beta flag in any case. Before, both passed.
    #[test]
    fn content_fetched_by_url_and_upper_case_betas_are_refused() {
        let by_url = br#"{"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x.example/?d=secret"}},
            {"type": "document", "source": {"type": "URL", "url": "https://x.example/a.pdf"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}"#;
        let why = refusal(by_url).expect("refused");
        assert!(why.contains("2 content blocks"), "{why}");
        let inline = br#"{"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}"#;
        assert_eq!(refusal(inline), None);
        assert_eq!(
            client_betas("Web-Fetch-2025-09-10, MCP-CLIENT-2025-04-04"),
            None
        );
    }

    #[test]
    fn client_tools_pass_and_server_tools_are_named() {
        let ok = br#"{"model":"m","messages":[],"tools":[
            {"name":"Bash","input_schema":{}},
            {"type":"custom","name":"x","input_schema":{}},
            {"type":"bash_20250124","name":"bash"},
            {"type":"text_editor_20250728","name":"str_replace_based_edit_tool"}]}"#;
        assert_eq!(refusal(ok), None);
        let bad = br#"{"model":"m","messages":[],
            "mcp_servers":[{"type":"url","url":"https://x.example/sse","name":"x"}],
            "tools":[{"type":"web_fetch_20250910","name":"web_fetch"},
                     {"type":"web_search_20250305","name":"web_search"},
                     {"type":"code_execution_20250825","name":"code_execution"},
                     {"type":7}]}"#;
        let why = refusal(bad).unwrap();
        for named in [
            "mcp_servers",
            "web_fetch_20250910",
            "web_search_20250305",
            "code_execution_20250825",
            "type 7",
        ] {
            assert!(why.contains(named), "{named}: {why}");
        }
        assert!(refusal(br#"{"container":"c1","messages":[]}"#).is_some());
        assert!(refusal(br#"{"mcp_servers":null,"messages":[]}"#).is_none());
        assert!(refusal(b"[1]").is_some());
        assert!(refusal(b"not json").is_some());
    }

    #[test]
    fn server_betas_are_dropped() {
        assert_eq!(
            client_betas(
                "mcp-client-2025-04-04, interleaved-thinking-2025-05-14,web-fetch-2025-09-10"
            )
            .as_deref(),
            Some("interleaved-thinking-2025-05-14")
        );
        assert_eq!(client_betas("code-execution-2025-08-25"), None);
        assert_eq!(client_betas(""), None);
    }
}
