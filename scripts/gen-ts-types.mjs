#!/usr/bin/env node
// Writes the TypeScript SDK's API types (sdk/typescript/src/generated/api.ts)
// from the server's OpenAPI document, so the SDK's shapes and routes are the
// server's.
//
//     node scripts/gen-ts-types.mjs            # rewrite the module
//     node scripts/gen-ts-types.mjs --check    # exit 1 with a diff if it is stale
//
// Every schema of the document becomes an interface (objects) or a union of
// string literals (enums). Every operation becomes an entry of `operations`
// (method, path template, what its body and answer are) and of the
// `Operations` type (its path and query parameters, body and answer types),
// which the client's one request function is typed by: a route the server
// drops, renames or reshapes stops the SDK compiling. A construct the
// generator has no TypeScript reading of is refused (exit 2), never typed as
// `any`. Node's standard library only.

import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const DOCUMENT = "crates/control-plane/tests/control_plane/snapshots/openapi.json";
const OUTPUT = "sdk/typescript/src/generated/api.ts";

// Answers the document describes only in prose (no content schema), with the
// schema they carry. A name missing from the document is refused.
const RESPONSE_OVERRIDES = { status: "Status" };

class Refused extends Error {}

const doc = JSON.parse(readFileSync(join(ROOT, DOCUMENT), "utf8"));
const schemas = doc.components?.schemas ?? {};

const IDENT = /^[A-Za-z_$][A-Za-z0-9_$]*$/;
const key = (name) => (IDENT.test(name) ? name : JSON.stringify(name));

function refName(ref, where) {
  const m = /^#\/components\/schemas\/(.+)$/.exec(ref);
  if (!m || !(m[1] in schemas)) throw new Refused(`${where}: unresolvable $ref ${ref}`);
  return m[1];
}

function isBinary(s) {
  return s && s.type === "string" && s.format === "binary";
}

// The TypeScript type of a schema used in a field, an item or a parameter.
function typeOf(s, where) {
  if (s === undefined || s === true) throw new Refused(`${where}: no schema`);
  if (s.$ref) {
    const name = refName(s.$ref, where);
    if (isBinary(schemas[name])) return "Uint8Array";
    return name;
  }
  if (s.oneOf || s.anyOf) {
    const parts = (s.oneOf ?? s.anyOf).map((x, i) => typeOf(x, `${where}|${i}`));
    return [...new Set(parts)].join(" | ");
  }
  if (s.allOf) {
    if (s.allOf.length !== 1) throw new Refused(`${where}: allOf of ${s.allOf.length} schemas`);
    return typeOf(s.allOf[0], where);
  }
  if (s.enum) {
    if (!s.enum.every((v) => typeof v === "string")) throw new Refused(`${where}: a non-string enum`);
    return s.enum.map((v) => JSON.stringify(v)).join(" | ");
  }
  const types = Array.isArray(s.type) ? s.type : [s.type];
  const out = types.map((t) => {
    switch (t) {
      case "null":
        return "null";
      case "string":
        return isBinary(s) ? "Uint8Array" : "string";
      case "integer":
      case "number":
        return "number";
      case "boolean":
        return "boolean";
      case "array":
        return arrayOf(typeOf(s.items, `${where}[]`));
      case "object":
        return objectType(s, where);
      default:
        throw new Refused(`${where}: unsupported type ${JSON.stringify(s.type)}`);
    }
  });
  return out.join(" | ");
}

function arrayOf(t) {
  return /^[A-Za-z0-9_]+$/.test(t) ? `${t}[]` : `Array<${t}>`;
}

// An inline object: a map, or an open bag of values.
function objectType(s, where) {
  if (s.properties && Object.keys(s.properties).length) {
    throw new Refused(`${where}: an inline object with properties; give it a name in the document`);
  }
  if (s.additionalProperties && typeof s.additionalProperties === "object") {
    return `Record<string, ${typeOf(s.additionalProperties, `${where}{}`)}>`;
  }
  return "Record<string, unknown>";
}

// An object form of a oneOf, written inline: `{ allow: string[] }`.
function inlineObject(s, where) {
  const required = new Set(s.required ?? []);
  const fields = Object.entries(s.properties).map(
    ([prop, ps]) => `${key(prop)}${required.has(prop) ? "" : "?"}: ${typeOf(ps, `${where}.${prop}`)}`,
  );
  return `{ ${fields.join("; ")} }`;
}

function jsdoc(text, indent) {
  if (!text) return "";
  const lines = text.trim().split("\n");
  if (lines.length === 1) return `${indent}/** ${lines[0].replace(/\*\//g, "*\\/")} */\n`;
  return `${indent}/**\n${lines.map((l) => `${indent} * ${l.replace(/\*\//g, "*\\/")}`.trimEnd()).join("\n")}\n${indent} */\n`;
}

function schemaDecl(name, s) {
  const where = `components.schemas.${name}`;
  if (isBinary(s)) return null; // raw bytes: bodies and answers, never a JSON shape
  let out = jsdoc(s.description, "");
  if (s.oneOf && s.oneOf.some((x) => x.enum)) {
    // String constants and object forms, such as a network mode or an
    // allow list: the union of them, and the constants listed.
    const values = s.oneOf.filter((x) => x.enum).flatMap((x) => x.enum);
    const parts = s.oneOf.map((x, i) =>
      x.type === "object" && x.properties ? inlineObject(x, `${where}|${i}`) : typeOf(x, `${where}|${i}`),
    );
    out += `export type ${name} = ${[...new Set(parts)].join(" | ")};\n`;
    out += `/** Every constant ${name} value the document lists. */\n`;
    out += `export const ${name}Values: readonly ${name}[] = [${values.map((v) => JSON.stringify(v)).join(", ")}];\n`;
    return out;
  }
  if (s.enum) {
    out += `export type ${name} = ${typeOf(s, where)};\n`;
    out += `/** Every ${name} value the document lists. */\n`;
    out += `export const ${name}Values: readonly ${name}[] = [${s.enum.map((v) => JSON.stringify(v)).join(", ")}];\n`;
    return out;
  }
  if (s.oneOf && s.oneOf.every((x) => x.type === "object" && Object.keys(x.properties ?? {}).length === 1)) {
    // An externally tagged enum: each alternative is an object with one key.
    const parts = s.oneOf.map((x, i) => {
      const [prop, ps] = Object.entries(x.properties)[0];
      return `{ ${key(prop)}: ${typeOf(ps, `${where}|${i}.${prop}`)} }`;
    });
    out += `export type ${name} =\n${parts.map((p) => `  | ${p}`).join("\n")};\n`;
    return out;
  }
  if (s.type !== "object" || !s.properties) throw new Refused(`${where}: neither an object with properties nor an enum`);
  const required = new Set(s.required ?? []);
  out += `export interface ${name} {\n`;
  for (const [prop, ps] of Object.entries(s.properties)) {
    out += jsdoc(ps.description, "  ");
    out += `  ${key(prop)}${required.has(prop) ? "" : "?"}: ${typeOf(ps, `${where}.${prop}`)};\n`;
  }
  out += "}\n";
  return out;
}

// What a body or an answer is: JSON of a type, raw bytes, text, an event
// stream, or nothing.
function contentKind(content, where) {
  const types = Object.keys(content ?? {});
  if (types.length === 0) return { kind: "none", type: "void" };
  if (types.length > 1) throw new Refused(`${where}: several content types (${types.join(", ")})`);
  const [ct] = types;
  const schema = content[ct].schema;
  if (ct === "application/json") return { kind: "json", type: typeOf(schema, where), contentType: ct };
  if (ct === "application/octet-stream" || ct === "application/x-tar") return { kind: "binary", type: "Uint8Array", contentType: ct };
  if (ct === "text/event-stream") return { kind: "event-stream", type: "ReadableStream<Uint8Array>", contentType: ct };
  if (ct.startsWith("text/")) return { kind: "text", type: "string", contentType: ct };
  throw new Refused(`${where}: content type ${ct}`);
}

const METHODS = ["get", "put", "post", "delete", "patch"];

function operationsOf() {
  const ops = [];
  for (const [path, item] of Object.entries(doc.paths ?? {})) {
    for (const method of Object.keys(item)) {
      if (!METHODS.includes(method)) {
        if (method === "parameters") throw new Refused(`${path}: path-level parameters`);
        continue;
      }
      const o = item[method];
      const id = o.operationId;
      const where = `${method.toUpperCase()} ${path}`;
      if (!id || !IDENT.test(id)) throw new Refused(`${where}: no usable operationId`);
      const params = { path: [], query: [], header: [] };
      for (const p of o.parameters ?? []) {
        if (!(p.in in params)) throw new Refused(`${where}: parameter in ${p.in}`);
        params[p.in].push(p);
      }
      const body = o.requestBody ? contentKind(o.requestBody.content, `${where} body`) : { kind: "none", type: "void" };
      const codes = Object.keys(o.responses ?? {}).filter((c) => /^2\d\d$/.test(c)).sort();
      // A WebSocket upgrade (101) is no fetch call: the route table leaves
      // it to a WebSocket client.
      if (codes.length === 0 && "101" in (o.responses ?? {})) continue;
      if (codes.length === 0) throw new Refused(`${where}: no 2xx answer`);
      const ok = o.responses[codes[0]];
      let response = contentKind(ok.content, `${where} answer`);
      if (id in RESPONSE_OVERRIDES) {
        const name = RESPONSE_OVERRIDES[id];
        if (!(name in schemas)) throw new Refused(`${where}: the override names ${name}, which the document lacks`);
        if (response.kind !== "none") throw new Refused(`${where}: the document now has an answer schema; drop the override`);
        response = { kind: "json", type: name };
      } else if (response.kind === "none" && codes[0] !== "204" && /event-stream/.test(ok.description ?? "")) {
        response = { kind: "event-stream", type: "ReadableStream<Uint8Array>" };
      }
      ops.push({ id, method: method.toUpperCase(), path, params, body, response, status: Number(codes[0]), summary: o.summary ?? o.description });
    }
  }
  ops.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  return ops;
}

function paramsType(list, where) {
  if (list.length === 0) return "Record<string, never>";
  return `{ ${list.map((p) => `${key(p.name)}${p.required ? "" : "?"}: ${typeOf(p.schema, `${where}.${p.name}`)}`).join("; ")} }`;
}

function generate() {
  let out = `// Generated by scripts/gen-ts-types.mjs from the server's OpenAPI document
// (${DOCUMENT}); do not edit.
// The shapes are defined in crates/api: change them there, regenerate the
// document (UPDATE_SNAPSHOTS=1 cargo nextest run -p stacyvm-control-plane -E 'test(openapi)'),
// then run: node scripts/gen-ts-types.mjs
/**
 * The StacyVM API's shapes (${doc.info?.title ?? "API"}, version ${doc.info?.version ?? "?"}) and routes, as
 * the server's OpenAPI document declares them. Times are RFC 3339 strings.
 * @module
 */

`;
  for (const name of Object.keys(schemas).sort()) {
    const decl = schemaDecl(name, schemas[name]);
    if (decl) out += decl + "\n";
  }
  const ops = operationsOf();
  out += `/** How an operation's body or answer travels. */
export type ContentKind = "none" | "json" | "binary" | "text" | "event-stream";

/** An operation's route: its method, path template and content kinds. */
export interface OperationRoute {
  readonly method: "GET" | "PUT" | "POST" | "DELETE" | "PATCH";
  readonly path: string;
  readonly status: number;
  readonly body: ContentKind;
  readonly bodyContentType: string | null;
  readonly response: ContentKind;
}

/** Every operation of the API by its operationId. */
export const operations = {
`;
  for (const o of ops) {
    out += `  ${o.id}: { method: "${o.method}", path: ${JSON.stringify(o.path)}, status: ${o.status}, body: "${o.body.kind}", bodyContentType: ${o.body.contentType && o.body.kind !== "json" ? JSON.stringify(o.body.contentType) : "null"}, response: "${o.response.kind}" },\n`;
  }
  out += `} as const satisfies Record<string, OperationRoute>;

/** The types of every operation's parameters, body and answer. */
export interface Operations {
`;
  for (const o of ops) {
    const w = `${o.method} ${o.path}`;
    out += `  ${o.id}: {\n`;
    out += `    path: ${paramsType(o.params.path, w)};\n`;
    out += `    query: ${paramsType(o.params.query, w)};\n`;
    out += `    headers: ${paramsType(o.params.header, w)};\n`;
    out += `    body: ${o.body.kind === "json" ? o.body.type : o.body.kind === "none" ? "never" : "Uint8Array"};\n`;
    out += `    response: ${o.response.type};\n`;
    out += `  };\n`;
  }
  out += "}\n\n/** An operation's id. */\nexport type OperationId = keyof Operations;\n";
  return out;
}

function diff(a, b) {
  // The changed middle, between the lines both share at the start and the end.
  const x = a.split("\n");
  const y = b.split("\n");
  let head = 0;
  while (head < x.length && head < y.length && x[head] === y[head]) head++;
  let tail = 0;
  while (tail < x.length - head && tail < y.length - head && x[x.length - 1 - tail] === y[y.length - 1 - tail]) tail++;
  const removed = x.slice(head, x.length - tail).map((l) => `-${l}`);
  const added = y.slice(head, y.length - tail).map((l) => `+${l}`);
  return [`@@ line ${head + 1} @@`, ...removed, ...added].slice(0, 200).join("\n");
}

function main() {
  const check = process.argv.includes("--check");
  let text;
  try {
    text = generate();
  } catch (e) {
    if (e instanceof Refused) {
      console.error(`gen-ts-types.mjs: ${e.message}`);
      return 2;
    }
    throw e;
  }
  const out = join(ROOT, OUTPUT);
  if (!check) {
    writeFileSync(out, text);
    return 0;
  }
  const current = existsSync(out) ? readFileSync(out, "utf8") : "";
  if (current === text) return 0;
  console.log(`--- ${OUTPUT} (as it is)\n+++ ${OUTPUT} (as generated)\n${diff(current, text)}`);
  console.error(`${OUTPUT} is stale: run node scripts/gen-ts-types.mjs`);
  return 1;
}

process.exitCode = main();
