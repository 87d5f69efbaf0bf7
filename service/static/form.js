// A form built from a kind's params JSON schema (GET /v1/methods: params_schema, pydantic's).
//
// Every node of the schema becomes a node object with the same interface:
//   el            its DOM
//   value()       the JSON value it holds (object fields equal to their default are left out,
//                 so the server's defaults apply); undefined when empty
//   set(v)        show v (undefined: the default)
//   validate()    client-side checks (required, type, min/max): [{node, message}]
//   locate(loc)   the node a pydantic error location (details[].loc) points at
//   showError(m)  the message next to the field (m = "" clears it)
// Supported: type string/integer/number/boolean, enum, const, $ref/$defs, nested objects,
// anyOf with null (optional), other anyOf (a choice of types), oneOf with a discriminator,
// arrays (repeatable rows; arrays of an enum as checkboxes), anything else as JSON text.

import { h, newId } from "./dom.js";

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

class Ctx {
  constructor(root, env) {
    this.defs = root.$defs || root.definitions || {};
    this.env = env; // {labels: () => [...], labelsList: "<datalist id>"}
    this.nodes = [];
  }

  /** Resolves $ref (and pydantic's single allOf) keeping the referring schema's own keys. */
  deref(schema) {
    let s = schema || {};
    for (let i = 0; i < 32; i++) {
      if (s.$ref) {
        const { $ref, ...own } = s;
        s = { ...this.defs[$ref.split("/").pop()], ...own };
      } else if (Array.isArray(s.allOf) && s.allOf.length === 1) {
        const { allOf, ...own } = s;
        s = { ...allOf[0], ...own };
      } else return s;
    }
    return s;
  }
}

/** The root form of one kind: {el, value, set, validate, locate, showError, clearErrors}. */
export function buildForm(schema, env) {
  const ctx = new Ctx(schema, env);
  const root = make(ctx, ctx.deref(schema), { path: [], label: "params", root: true });
  root.set(undefined);
  return {
    el: root.el,
    value: () => root.value() ?? {},
    set: (v) => root.set(v),
    validate: () => {
      clearErrors(ctx);
      return root.validate();
    },
    locate: (loc) => root.locate(loc || []),
    clearErrors: () => clearErrors(ctx),
    root,
  };
}

function clearErrors(ctx) {
  for (const n of ctx.nodes) n.showError("");
}

function make(ctx, schema, opts) {
  const s = ctx.deref(schema);
  if (opts.path.length === 1 && opts.path[0] === "target" && !opts.inList) return new TargetNode(ctx, s, opts);
  if (Array.isArray(s.oneOf) && s.discriminator) return new TaggedNode(ctx, s, opts);
  const alts = s.anyOf || (Array.isArray(s.type) ? s.type.map((type) => ({ type })) : null);
  if (Array.isArray(alts)) {
    const { anyOf, type, ...outer } = s;
    const rest = alts.map((a) => ctx.deref(a)).filter((a) => a.type !== "null");
    const nullable = rest.length < alts.length;
    if (rest.length === 1) {
      const inner = { ...rest[0], ...outer };
      if (nullable && isScalar(inner)) return make(ctx, inner, { ...opts, nullable: true });
      return nullable ? new OptionalNode(ctx, inner, opts) : make(ctx, inner, opts);
    }
    const choice = { ...outer, anyOf: rest };
    return nullable ? new OptionalNode(ctx, choice, opts, ChoiceNode) : new ChoiceNode(ctx, choice, opts);
  }
  if (s.const !== undefined) return new ConstNode(ctx, s, opts);
  if (Array.isArray(s.enum)) return new SelectNode(ctx, s, opts);
  if (s.type === "object" && s.properties) return new ObjectNode(ctx, s, opts);
  if (s.type === "array") {
    const items = ctx.deref(s.items || {});
    return Array.isArray(items.enum) && s.uniqueItems !== false && !opts.nullable
      ? new ChecksNode(ctx, s, opts, items)
      : new ListNode(ctx, s, opts);
  }
  if (s.type === "integer" || s.type === "number") return new NumberNode(ctx, s, opts);
  if (s.type === "boolean") return new BoolNode(ctx, s, opts);
  if (s.type === "string") return new TextNode(ctx, s, opts);
  return new JsonNode(ctx, s, opts);
}

/** The description, plus what leaving a list empty means when the schema has no default. */
function helpOf(schema, opts) {
  const empty = schema.default === undefined && !opts.required ? " Leave empty for the server's default." : "";
  const text = `${schema.description || ""}${empty}`.trim();
  return text ? h("p.help", {}, text) : null;
}

const isScalar = (s) => Array.isArray(s.enum) || ["integer", "number", "string"].includes(s.type);

// --- base ------------------------------------------------------------------------------------

class Node {
  constructor(ctx, schema, opts) {
    this.ctx = ctx;
    this.schema = schema;
    this.opts = opts;
    this.path = opts.path;
    this.nullable = !!opts.nullable;
    this.default = schema.default;
    this.errorEl = h("p.field-error", { id: newId("err"), hidden: true });
    ctx.nodes.push(this);
  }

  get name() {
    return this.opts.label ?? String(this.path[this.path.length - 1] ?? "params");
  }

  /** label + control + help + error, as one block with data-field="a.b.c". */
  field(control, { inline = false } = {}) {
    const help = this.schema.description ? h("p.help", { id: newId("help") }, this.schema.description) : null;
    control.setAttribute("aria-describedby", [help?.id, this.errorEl.id].filter(Boolean).join(" "));
    if (!control.id) control.id = newId("in");
    const label = h("label", { for: control.id }, this.name);
    return h(
      `div.field${inline ? ".inline" : ""}`,
      { dataset: { field: this.path.join(".") } },
      inline ? [control, label] : [label, control],
      help,
      this.errorEl,
    );
  }

  /** A fieldset of this node: legend, help, error, then the body. */
  group(cls, help, ...body) {
    return h(`fieldset.${cls}`, { dataset: { field: this.path.join(".") } }, h("legend", {}, this.name), help, this.errorEl, body);
  }

  showError(message) {
    this.errorEl.textContent = message;
    this.errorEl.hidden = !message;
    this.input?.setAttribute("aria-invalid", message ? "true" : "false");
  }

  validate() {
    return [];
  }

  locate() {
    return this;
  }

  fail(message) {
    return [{ node: this, message }];
  }
}

// --- scalars ---------------------------------------------------------------------------------

class NumberNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    const s = schema;
    this.integer = s.type === "integer";
    this.input = h("input", {
      type: "number",
      inputmode: this.integer ? "numeric" : "decimal",
      step: this.integer ? "1" : "any",
      min: s.minimum ?? s.exclusiveMinimum,
      max: s.maximum ?? s.exclusiveMaximum,
      placeholder: this.nullable ? "null (automatic)" : undefined,
    });
    // Flagged as soon as the value is left, not only at Run.
    this.input.addEventListener("change", () => this.showError(this.validate()[0]?.message || ""));
    this.el = this.field(this.input);
  }

  value() {
    const t = this.input.value.trim();
    if (t === "") return this.nullable ? null : undefined;
    return Number(t);
  }

  set(v) {
    const x = v === undefined ? this.default : v;
    this.input.value = x === null || x === undefined ? "" : String(x);
  }

  validate() {
    const s = this.schema;
    // A number input's .value is "" for text it cannot parse: say so rather than send nothing.
    if (this.input.validity.badInput) return this.fail("not a number");
    const v = this.value();
    if (v === undefined) return this.default === undefined && this.opts.required ? this.fail("required") : [];
    if (v === null) return [];
    if (!Number.isFinite(v)) return this.fail("not a number");
    if (this.integer && !Number.isInteger(v)) return this.fail("must be a whole number");
    if (s.minimum !== undefined && v < s.minimum) return this.fail(`must be ≥ ${s.minimum}`);
    if (s.exclusiveMinimum !== undefined && v <= s.exclusiveMinimum) return this.fail(`must be > ${s.exclusiveMinimum}`);
    if (s.maximum !== undefined && v > s.maximum) return this.fail(`must be ≤ ${s.maximum}`);
    if (s.exclusiveMaximum !== undefined && v >= s.exclusiveMaximum) return this.fail(`must be < ${s.exclusiveMaximum}`);
    return [];
  }
}

class TextNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    this.input = h("input", { type: "text", placeholder: this.nullable ? "null" : undefined });
    this.el = this.field(this.input);
  }

  value() {
    const t = this.input.value;
    return t === "" ? (this.nullable ? null : this.default === undefined ? undefined : "") : t;
  }

  set(v) {
    const x = v === undefined ? this.default : v;
    this.input.value = x === null || x === undefined ? "" : String(x);
  }

  validate() {
    const s = this.schema;
    const v = this.value();
    if (v === undefined) return this.opts.required ? this.fail("required") : [];
    if (v === null) return [];
    if (s.minLength !== undefined && v.length < s.minLength) return this.fail(`at least ${s.minLength} characters`);
    if (s.maxLength !== undefined && v.length > s.maxLength) return this.fail(`at most ${s.maxLength} characters`);
    if (s.pattern && !new RegExp(s.pattern, "u").test(v)) return this.fail(`must match ${s.pattern}`);
    return [];
  }
}

class BoolNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    this.input = h("input", { type: "checkbox" });
    this.el = this.field(this.input, { inline: true });
  }

  value() {
    return this.input.checked;
  }

  set(v) {
    this.input.checked = !!(v === undefined ? this.default : v);
  }
}

class SelectNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    const options = schema.enum.map((v) => h("option", { value: JSON.stringify(v) }, String(v)));
    if (this.nullable) options.unshift(h("option", { value: "null" }, "(none)"));
    this.input = h("select", {}, options);
    this.el = this.field(this.input);
  }

  value() {
    return JSON.parse(this.input.value);
  }

  set(v) {
    const x = v === undefined ? (this.default ?? (this.nullable ? null : this.schema.enum[0])) : v;
    this.input.value = JSON.stringify(x);
    if (this.input.selectedIndex < 0) this.input.selectedIndex = 0;
  }
}

class ConstNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    this.el = h("span", { hidden: true });
  }

  value() {
    return this.schema.const;
  }

  set() {}
}

class JsonNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    this.input = h("textarea", { rows: 3, spellcheck: "false", placeholder: "JSON" });
    this.el = this.field(this.input);
  }

  value() {
    const t = this.input.value.trim();
    if (t === "") return this.nullable ? null : undefined;
    try {
      return JSON.parse(t);
    } catch {
      return undefined;
    }
  }

  set(v) {
    const x = v === undefined ? this.default : v;
    this.input.value = x === undefined ? "" : JSON.stringify(x);
  }

  validate() {
    const t = this.input.value.trim();
    return t !== "" && this.value() === undefined ? this.fail("not valid JSON") : [];
  }
}

/** `target`: a search over the model's labels that gives the class index (empty: predicted). */
class TargetNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    this.input = h("input", {
      type: "search",
      list: ctx.env.labelsList,
      placeholder: "predicted class (type to search the labels)",
      autocomplete: "off",
    });
    this.resolved = h("output", { for: "" });
    this.input.addEventListener("input", () => this.describe());
    this.el = this.field(this.input);
    this.el.append(this.resolved);
  }

  resolve() {
    const t = this.input.value.trim();
    if (t === "") return { index: null };
    const labels = this.ctx.env.labels();
    const m = t.match(/^(\d+)(?::|$)/);
    if (m) {
      const i = Number(m[1]);
      return i < labels.length ? { index: i } : { error: `class ${i} does not exist (${labels.length} classes)` };
    }
    const low = t.toLowerCase();
    const exact = labels.findIndex((l) => l.toLowerCase() === low);
    if (exact >= 0) return { index: exact };
    const hits = labels.map((l, i) => [l, i]).filter(([l]) => l.toLowerCase().includes(low));
    if (hits.length === 1) return { index: hits[0][1] };
    return { error: hits.length ? `${hits.length} labels match: pick one from the list` : "no label matches" };
  }

  describe() {
    const r = this.resolve();
    const labels = this.ctx.env.labels();
    this.resolved.textContent =
      r.index === null ? "" : r.index !== undefined ? `class index ${r.index}: ${labels[r.index]}` : "";
  }

  value() {
    const r = this.resolve();
    return r.error ? undefined : r.index;
  }

  set(v) {
    const x = v === undefined ? this.default : v;
    const labels = this.ctx.env.labels();
    if (typeof x === "number") this.input.value = labels[x] !== undefined ? `${x}: ${labels[x]}` : String(x);
    else this.input.value = x === null || x === undefined ? "" : JSON.stringify(x);
    this.describe();
  }

  validate() {
    const r = this.resolve();
    return r.error ? this.fail(r.error) : [];
  }
}

// --- composites ------------------------------------------------------------------------------

class ObjectNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    const required = new Set(schema.required || []);
    this.children = new Map();
    for (const [name, prop] of Object.entries(schema.properties || {})) {
      if (opts.skip === name) continue;
      const child = make(ctx, prop, { path: [...this.path, name], required: required.has(name), inList: opts.inList });
      this.children.set(name, child);
    }
    const body = [...this.children.values()].map((c) => c.el);
    if (opts.root) {
      this.el = h("div.form-root", {}, this.errorEl, body);
    } else if (opts.bare) {
      this.el = h("div.object", {}, body, this.errorEl);
    } else {
      this.el = this.group("object", schema.description ? h("p.help", {}, schema.description) : null, body);
    }
  }

  value() {
    const out = {};
    for (const [name, child] of this.children) {
      const v = child.value();
      if (v === undefined) continue;
      if (!child.opts.required && same(v, child.initial)) continue;
      out[name] = v;
    }
    return out;
  }

  set(v) {
    const obj = v && typeof v === "object" && !Array.isArray(v) ? v : {};
    for (const [name, child] of this.children) {
      if (child.initial === undefined) {
        child.set(undefined);
        child.initial = child.value(); // what the default looks like once shown: left out when unchanged
      }
      child.set(obj[name]);
    }
  }

  validate() {
    return [...this.children.values()].flatMap((c) => c.validate());
  }

  locate(loc) {
    if (loc.length && this.children.has(loc[0])) return this.children.get(loc[0]).locate(loc.slice(1));
    return this;
  }
}

/** oneOf + discriminator: a select of the variants, then the chosen variant's fields. */
class TaggedNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    this.prop = schema.discriminator.propertyName;
    const mapping = schema.discriminator.mapping || {};
    this.variants = new Map();
    for (const alt of schema.oneOf) {
      const s = ctx.deref(alt);
      const tag = s.properties?.[this.prop]?.const ?? Object.keys(mapping).find((k) => mapping[k] === alt.$ref);
      this.variants.set(String(tag), { schema: s, node: null });
    }
    this.input = h(
      "select",
      { onchange: () => this.show(this.input.value) },
      [...this.variants.keys()].map((t) => h("option", { value: t }, t)),
    );
    this.body = h("div.variant");
    const selector = this.field(this.input);
    selector.dataset.field = [...this.path, this.prop].join(".");
    selector.querySelector("label").textContent = this.path.length ? `${this.name}: ${this.prop}` : this.prop;
    const inner = [selector, this.body];
    this.el = opts.root
      ? h("div.form-root.tagged", {}, this.errorEl, inner)
      : this.group("object.tagged", null, inner);
  }

  variant(tag) {
    const v = this.variants.get(tag);
    if (!v.node) {
      v.node = new ObjectNode(this.ctx, v.schema, { path: this.path, skip: this.prop, bare: true, inList: this.opts.inList });
      v.node.set(undefined);
    }
    return v.node;
  }

  show(tag) {
    this.input.value = tag;
    this.current = this.variant(tag);
    this.body.replaceChildren(this.current.el);
  }

  value() {
    return { [this.prop]: this.input.value, ...this.current.value() };
  }

  set(v) {
    const d = v === undefined ? this.default : v;
    const tag = d && this.variants.has(String(d[this.prop])) ? String(d[this.prop]) : [...this.variants.keys()][0];
    this.show(tag);
    this.current.set(d && String(d[this.prop]) === tag ? d : undefined);
  }

  validate() {
    return this.current.validate();
  }

  locate(loc) {
    if (loc.length && this.variants.has(String(loc[0]))) return this.current.locate(loc.slice(1));
    return loc.length ? this.current.locate(loc) : this;
  }
}

/** anyOf [X, null] where X is not a scalar: a checkbox, then X. */
class OptionalNode extends Node {
  constructor(ctx, schema, opts, Inner = null) {
    super(ctx, schema, opts);
    this.inner = Inner ? new Inner(ctx, schema, opts) : make(ctx, schema, opts);
    this.input = h("input", { type: "checkbox", onchange: () => this.sync() });
    const label = `set ${this.name}` + (schema.description ? `: ${schema.description}` : "");
    this.el = h(
      "div.optional",
      { dataset: { field: this.path.join(".") } },
      h("div.field.inline", {}, this.input, h("label", { for: (this.input.id = newId("opt")) }, label)),
      this.errorEl,
      this.inner.el,
    );
  }

  sync() {
    this.inner.el.hidden = !this.input.checked;
  }

  value() {
    return this.input.checked ? this.inner.value() : null;
  }

  set(v) {
    const x = v === undefined ? this.default : v;
    this.input.checked = x !== null && x !== undefined;
    this.inner.set(this.input.checked ? x : undefined);
    this.sync();
  }

  validate() {
    return this.input.checked ? this.inner.validate() : [];
  }

  locate(loc) {
    return this.input.checked ? this.inner.locate(loc) : this;
  }
}

/** anyOf of several non-null schemas: a select of the alternatives, then the chosen one. */
class ChoiceNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    this.alts = schema.anyOf.map((a, i) => ({
      title: a.title || describeType(ctx, a),
      node: make(ctx, { ...a, description: undefined }, { ...opts, label: `${this.name} (${a.title || describeType(ctx, a)})`, nullable: false }),
      i,
    }));
    this.input = h(
      "select",
      { onchange: () => this.show(Number(this.input.value)) },
      this.alts.map((a) => h("option", { value: String(a.i) }, a.title)),
    );
    const selector = this.field(this.input);
    this.el = h("div.choice", {}, selector, this.alts.map((a) => a.node.el));
  }

  show(i) {
    this.input.value = String(i);
    this.alts.forEach((a) => (a.node.el.hidden = a.i !== i));
    this.current = this.alts[i].node;
  }

  value() {
    return this.current.value();
  }

  set(v) {
    const x = v === undefined ? this.default : v;
    const i = Math.max(0, this.alts.findIndex((a) => fits(this.ctx, a.node.schema, x)));
    this.show(i);
    this.current.set(x);
  }

  validate() {
    return this.current.validate();
  }
}

function describeType(ctx, s) {
  const d = ctx.deref(s);
  if (d.type === "array") return `list of ${describeType(ctx, d.items || {})}`;
  if (Array.isArray(d.enum)) return "choice";
  return d.type || d.title || "value";
}

function fits(ctx, schema, v) {
  const s = ctx.deref(schema);
  if (v === undefined || v === null) return false;
  if (Array.isArray(v)) return s.type === "array";
  if (typeof v === "number") return s.type === "number" || (s.type === "integer" && Number.isInteger(v));
  if (typeof v === "boolean") return s.type === "boolean";
  if (typeof v === "string") return s.type === "string" || Array.isArray(s.enum);
  return s.type === "object" || Array.isArray(s.oneOf);
}

/** An array: one row per item (add, remove), min/max items respected. */
class ListNode extends Node {
  constructor(ctx, schema, opts) {
    super(ctx, schema, opts);
    this.items = schema.items || {};
    this.rows = [];
    this.list = h("ol.rows");
    this.addButton = h("button.add", { type: "button", onclick: () => this.add(undefined, true) }, `Add to ${this.name}`);
    this.el = this.group("list", helpOf(schema, opts), this.list, this.addButton);
  }

  add(v, focus = false) {
    const i = this.rows.length;
    const node = make(this.ctx, this.items, { path: [...this.path, i], label: `${this.name} #${i + 1}`, inList: true });
    node.set(v);
    const remove = h("button.remove", { type: "button", "aria-label": `Remove ${this.name} #${i + 1}` }, "Remove");
    const row = { node, li: h("li", {}, node.el, remove) };
    remove.addEventListener("click", () => this.remove(row));
    this.rows.push(row);
    this.list.append(row.li);
    this.limits();
    if (focus) row.li.querySelector("input, select, textarea")?.focus();
  }

  remove(row) {
    const values = this.rows.filter((r) => r !== row).map((r) => r.node.value());
    this.set(values);
  }

  limits() {
    const { minItems = 0, maxItems = Infinity } = this.schema;
    this.addButton.disabled = this.rows.length >= maxItems;
    for (const r of this.rows) r.li.querySelector(":scope > button.remove").disabled = this.rows.length <= minItems;
  }

  /** No default in the schema (pydantic's default_factory) and not required: no rows means
   * "the server's default", which the help says. */
  get serverDefault() {
    return this.default === undefined && !this.opts.required;
  }

  value() {
    if (!this.rows.length && this.serverDefault) return undefined;
    return this.rows.map((r) => r.node.value());
  }

  set(v) {
    const x = v === undefined ? this.default : v;
    this.rows = [];
    this.list.replaceChildren();
    for (const item of Array.isArray(x) ? x : []) this.add(item);
    this.limits();
  }

  validate() {
    const { minItems, maxItems } = this.schema;
    const own = [];
    const empty = !this.rows.length && this.serverDefault;
    if (!empty && minItems !== undefined && this.rows.length < minItems) own.push({ node: this, message: `at least ${minItems}` });
    if (maxItems !== undefined && this.rows.length > maxItems) own.push({ node: this, message: `at most ${maxItems}` });
    return [...own, ...this.rows.flatMap((r) => r.node.validate())];
  }

  locate(loc) {
    if (loc.length && Number.isInteger(loc[0]) && this.rows[loc[0]]) return this.rows[loc[0]].node.locate(loc.slice(1));
    return this;
  }
}

/** An array of an enum: one checkbox per value. */
class ChecksNode extends Node {
  constructor(ctx, schema, opts, items) {
    super(ctx, schema, opts);
    this.values = items.enum;
    this.boxes = this.values.map((v) => {
      const box = h("input", { type: "checkbox", id: newId("chk"), value: JSON.stringify(v) });
      return { v, box, el: h("span.check", {}, box, h("label", { for: box.id }, String(v))) };
    });
    this.el = this.group("checks", helpOf(schema, opts), h("div.check-row", {}, this.boxes.map((b) => b.el)));
  }

  value() {
    const on = this.boxes.filter((b) => b.box.checked).map((b) => b.v);
    return !on.length && this.default === undefined && !this.opts.required ? undefined : on;
  }

  set(v) {
    const x = v === undefined ? this.default : v;
    const on = new Set((Array.isArray(x) ? x : []).map((e) => JSON.stringify(e)));
    for (const b of this.boxes) b.box.checked = on.has(JSON.stringify(b.v));
  }

  validate() {
    const { minItems, maxItems } = this.schema;
    const v = this.value();
    if (v === undefined) return [];
    const n = v.length;
    if (minItems !== undefined && n < minItems) return this.fail(`pick at least ${minItems}`);
    if (maxItems !== undefined && n > maxItems) return this.fail(`pick at most ${maxItems}`);
    return [];
  }

  locate() {
    return this;
  }
}
