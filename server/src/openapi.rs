//! The OpenAPI 3.1 document served at `GET /openapi.json`, written by hand: the API is small
//! and a derive framework would cost more build time than the document is long.

use serde_json::{Value, json};

use crate::migration::Phase;

/// The document.
pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let err = |desc: &str| json!({"description": desc, "content": {"application/json": {"schema": error}}});
    let bearer = json!([{"bearer": []}]);
    let phases: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
    // Apart, to keep the document's json! under the macro recursion limit.
    let kubernetes_report = json!({"type": "object", "description": "Kubernetes mode only", "properties": {
        "deployment": {"type": "string"}, "replicas": {"type": "integer"},
        "selector": {"type": "string", "description": "the Deployment's label selector"},
        "identities": {"type": "array", "items": {"type": "object"}, "description": "the workload identities of its containers (the checkpoints' names)"},
        "stage": {"type": "string", "enum": ["before_stop", "stopped", "scaled_up"], "description": "how far the driver got (journaled before each patch; decides a recovery)"},
        "oldPods": {"type": "array", "items": {"type": "string"}},
        "newPods": {"type": "array", "items": {"type": "string"}},
        "stateRestored": {"type": "boolean"},
        "steps": {"type": "array", "items": {"type": "string"}}}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "kubernetes-mig migration server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Drives stateful migrations of containers between nodes. Outside Kubernetes a deployment is the set of containers with the containerd label mig.dev/workload=<name> (a pod: mig.dev/pod=<name>)."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string", "description": "what was wrong"},
                    "expected": {"type": "string", "description": "what would have been accepted"}}},
                "MigrateRequest": {"type": "object", "required": ["originNode", "destNode"],
                    "description": "exactly one of deployment, pod, container",
                    "properties": {
                        "deployment": {"type": "string"}, "pod": {"type": "string"},
                        "container": {"type": "string"}, "namespace": {"type": "string"},
                        "originNode": {"type": "string"}, "destNode": {"type": "string"},
                        "postCopy": {"type": "boolean", "default": false, "description": "post-copy (lazy) migration: the origin checkpoints all but the memory pages and stays frozen; the destination runs the workload at once and fetches the pages from the origin; a failure resumes it on the origin. Not supported in Kubernetes mode yet (400)"}}},
                "Migration": {"type": "object", "properties": {
                    "id": {"type": "string"},
                    "target": {"type": "object", "properties": {"kind": {"enum": ["deployment", "pod", "container"]}, "name": {"type": "string"}}},
                    "namespace": {"type": "string"}, "originNode": {"type": "string"}, "destNode": {"type": "string"},
                    "phase": {"enum": phases, "description": "finishing: the workload runs on the destination; the origin's stopped copy and its checkpoint are being removed"},
                    "containers": {"type": "array", "items": {"type": "string"}},
                    "createdUnixMs": {"type": "integer"},
                    "checkpointBytes": {"type": "integer"}, "bytesTransferred": {"type": "integer"},
                    "timings": {"type": "array", "items": {"type": "object", "properties": {
                        "phase": {"enum": phases}, "started_ms": {"type": "integer"}, "duration_ms": {"type": ["integer", "null"]}}}},
                    "downtimeMs": {"type": ["integer", "null"]}, "durationMs": {"type": ["integer", "null"]},
                    "failure": {"type": ["object", "null"], "properties": {
                        "phase": {"enum": phases}, "reason": {"type": "string"},
                        "recovery": {"type": "array", "items": {"type": "string"}}}},
                    "warnings": {"type": "array", "items": {"type": "string"}},
                    "destinationRunning": {"type": "boolean", "description": "the destination reported the workload running"},
                    "postCopy": {"type": "boolean", "description": "a post-copy migration"},
                    "checkpointInMemory": {"type": "object", "description": "whether the checkpoint was written in the node's checkpoint store in memory (tmpfs) rather than on disk, on each node", "properties": {
                        "origin": {"type": "boolean"}, "destination": {"type": "boolean"}}},
                    "kubernetes": kubernetes_report}},
                "Node": {"type": "object", "properties": {
                    "name": {"type": "string"}, "address": {"type": "string"}, "registered_unix": {"type": "integer"}}}
            }
        },
        "paths": {
            "/healthz": {"get": {"summary": "liveness", "responses": {"200": {"description": "ok"}}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI document"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
            "/nodes": {"get": {"summary": "registered node agents", "responses": {"200": {"description": "nodes",
                "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}}}}}}},
            "/pods": {"get": {"summary": "registered pods", "responses": {"200": {"description": "pods"}}}},
            "/register": {"post": {
                "summary": "register a node agent ({name, address}) or a pod ({id, env}); idempotent",
                "security": bearer,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"oneOf": [
                    {"type": "object", "required": ["name", "address"], "properties": {"name": {"type": "string"}, "address": {"type": "string"}}},
                    {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}, "env": {"type": "object", "additionalProperties": {"type": "string"}}}}]}}}},
                "responses": {"200": {"description": "registered"}, "400": err("invalid body"), "401": err("missing or wrong token")}}},
            "/migrate": {"post": {
                "summary": "start a migration; returns at once, the work runs in the background",
                "security": bearer,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MigrateRequest"}}}},
                "responses": {
                    "202": {"description": "accepted; Location: /migrations/{id}", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Migration"}}}},
                    "400": err("invalid body, name or origin == dest, or postCopy in Kubernetes mode"),
                    "401": err("missing or wrong token"),
                    "404": err("unknown node or workload"),
                    "409": err("the workload is already migrating, or its migration is being resolved after a controller restart"),
                    "500": err("the migration could not be journaled, so it was not started"),
                    "502": err("the origin agent failed")}}},
            "/migrations": {"get": {"summary": "all migrations", "responses": {"200": {"description": "records",
                "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Migration"}}}}}}}},
            "/migrations/{id}": {"get": {"summary": "one migration",
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "record", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Migration"}}}},
                              "404": err("no such migration")}}}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_enum_lists_every_phase_in_order() {
        let doc = document();
        let phases = &doc["components"]["schemas"]["Migration"]["properties"]["phase"]["enum"];
        assert_eq!(
            phases,
            &json!([
                "pending",
                "checkpointing",
                "transferring",
                "restoring",
                "finishing",
                "done",
                "failed",
                "rolled_back"
            ])
        );
    }
}
