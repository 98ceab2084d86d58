//! A small GraphQL executor by projection, for the fake Healthie endpoint: it parses a request
//! with `graphql-parser`, checks it against an SDL schema (fields, arguments, variables,
//! fragments, `@skip`/`@include`), measures depth and complexity as graphql-ruby does, and projects
//! the selection set out of stored JSON objects. Error messages follow graphql-ruby's wording.

use std::collections::{HashMap, HashSet};

use graphql_parser::query::{
    self as q, Definition, Document, FragmentDefinition, OperationDefinition, Selection,
    SelectionSet, TypeCondition,
};
use graphql_parser::schema as s;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::{json, Map, Value};

/// A type reference: `User`, `[ID]`, `UserConnection!`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeRef {
    Named(String),
    List(Box<TypeRef>),
    NonNull(Box<TypeRef>),
}

impl TypeRef {
    fn from_ast<'a>(t: &s::Type<'a, String>) -> TypeRef {
        match t {
            s::Type::NamedType(n) => TypeRef::Named(n.clone()),
            s::Type::ListType(inner) => TypeRef::List(Box::new(TypeRef::from_ast(inner))),
            s::Type::NonNullType(inner) => TypeRef::NonNull(Box::new(TypeRef::from_ast(inner))),
        }
    }

    /// The named type under any list and non-null wrappers.
    pub fn base(&self) -> &str {
        match self {
            TypeRef::Named(n) => n,
            TypeRef::List(t) | TypeRef::NonNull(t) => t.base(),
        }
    }

    fn nullable(&self) -> &TypeRef {
        match self {
            TypeRef::NonNull(t) => t,
            t => t,
        }
    }
}

impl std::fmt::Display for TypeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TypeRef::Named(n) => f.write_str(n),
            TypeRef::List(t) => write!(f, "[{t}]"),
            TypeRef::NonNull(t) => write!(f, "{t}!"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ArgDef {
    pub ty: TypeRef,
    pub default: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct FieldDef {
    pub ty: TypeRef,
    pub args: Vec<(String, ArgDef)>,
}

/// Object types, enums and scalars of an SDL document.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    objects: HashMap<String, HashMap<String, FieldDef>>,
    enums: HashMap<String, HashSet<String>>,
    scalars: HashSet<String>,
}

impl Schema {
    /// Loads object types, enums and scalars from SDL (interfaces, unions and inputs unsupported).
    pub fn parse(sdl: &str) -> Result<Schema, String> {
        let doc = s::parse_schema::<String>(sdl).map_err(|e| e.to_string())?;
        let mut schema = Schema::default();
        for b in ["String", "Int", "Float", "Boolean", "ID"] {
            schema.scalars.insert(b.to_string());
        }
        for def in doc.definitions {
            let s::Definition::TypeDefinition(td) = def else {
                continue;
            };
            match td {
                s::TypeDefinition::Scalar(t) => {
                    schema.scalars.insert(t.name);
                }
                s::TypeDefinition::Enum(t) => {
                    schema
                        .enums
                        .insert(t.name, t.values.into_iter().map(|v| v.name).collect());
                }
                s::TypeDefinition::Object(t) => {
                    let fields = t
                        .fields
                        .iter()
                        .map(|f| {
                            let args = f
                                .arguments
                                .iter()
                                .map(|a| {
                                    let default = a.default_value.as_ref().map(const_to_json);
                                    (
                                        a.name.clone(),
                                        ArgDef {
                                            ty: TypeRef::from_ast(&a.value_type),
                                            default,
                                        },
                                    )
                                })
                                .collect();
                            (
                                f.name.clone(),
                                FieldDef {
                                    ty: TypeRef::from_ast(&f.field_type),
                                    args,
                                },
                            )
                        })
                        .collect();
                    schema.objects.insert(t.name, fields);
                }
                _ => {}
            }
        }
        Ok(schema)
    }

    pub fn field(&self, object: &str, field: &str) -> Option<&FieldDef> {
        self.objects.get(object)?.get(field)
    }

    pub fn is_object(&self, name: &str) -> bool {
        self.objects.contains_key(name)
    }

    fn is_leaf(&self, name: &str) -> bool {
        self.scalars.contains(name) || self.enums.contains_key(name)
    }
}

fn const_to_json<'a>(v: &q::Value<'a, String>) -> Value {
    match v {
        q::Value::Variable(_) | q::Value::Null => Value::Null,
        q::Value::Int(n) => json!(n.as_i64()),
        q::Value::Float(f) => json!(f),
        q::Value::String(s) => json!(s),
        q::Value::Boolean(b) => json!(b),
        q::Value::Enum(e) => json!(e),
        q::Value::List(l) => Value::Array(l.iter().map(const_to_json).collect()),
        q::Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), const_to_json(v)))
                .collect(),
        ),
    }
}

/// A GraphQL error as it appears in the `errors` array.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphqlError {
    pub message: String,
    pub locations: Vec<(usize, usize)>,
    pub path: Vec<Value>,
    pub extensions: Option<Value>,
}

impl GraphqlError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            locations: Vec::new(),
            path: Vec::new(),
            extensions: None,
        }
    }

    fn at(mut self, pos: graphql_parser::Pos) -> Self {
        self.locations.push((pos.line, pos.column));
        self
    }

    fn ext(mut self, extensions: Value) -> Self {
        self.extensions = Some(extensions);
        self
    }

    pub fn with_path(mut self, path: Vec<Value>) -> Self {
        self.path = path;
        self
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("message".into(), json!(self.message));
        if !self.locations.is_empty() {
            let locs: Vec<Value> = self
                .locations
                .iter()
                .map(|(l, c)| json!({"line": l, "column": c}))
                .collect();
            m.insert("locations".into(), Value::Array(locs));
        }
        if !self.path.is_empty() {
            m.insert("path".into(), Value::Array(self.path.clone()));
        }
        if let Some(e) = &self.extensions {
            m.insert("extensions".into(), e.clone());
        }
        Value::Object(m)
    }
}

/// A requested field after fragments, directives and variables are resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The response key: the alias, or the field name.
    pub key: String,
    pub name: String,
    /// Coerced arguments, defaults from the schema included.
    pub args: Map<String, Value>,
    /// `None` for `__typename`.
    pub ty: Option<TypeRef>,
    pub selection: Vec<Field>,
    pub line: usize,
    pub column: usize,
}

impl Field {
    pub fn arg(&self, name: &str) -> Option<&Value> {
        self.args.get(name).filter(|v| !v.is_null())
    }
}

/// A request's parse or validation failure: everything graphql-ruby would report.
pub type Errors = Vec<GraphqlError>;

/// Parses, picks the operation, and checks it against the schema. Returns the root fields of
/// the `Query` type.
pub fn prepare(
    schema: &Schema,
    query: &str,
    variables: &Map<String, Value>,
    operation_name: Option<&str>,
) -> Result<Vec<Field>, Errors> {
    if query.trim().is_empty() {
        return Err(vec![GraphqlError::new("No query string was present")]);
    }
    let doc: Document<'_, String> = q::parse_query(query).map_err(|e| vec![parse_error(&e)])?;
    let mut fragments: HashMap<&str, &FragmentDefinition<'_, String>> = HashMap::new();
    let mut operations = Vec::new();
    for def in &doc.definitions {
        match def {
            Definition::Fragment(f) => {
                fragments.insert(f.name.as_str(), f);
            }
            Definition::Operation(op) => operations.push(op),
        }
    }
    let op = match operation_name {
        Some(name) => operations
            .iter()
            .find(|op| op_name(op) == Some(name))
            .copied()
            .ok_or_else(|| vec![GraphqlError::new(format!("No operation named \"{name}\""))])?,
        None if operations.len() == 1 => operations[0],
        None if operations.is_empty() => {
            return Err(vec![GraphqlError::new("No operations in query string")])
        }
        None => return Err(vec![GraphqlError::new("An operation name is required")]),
    };
    let (var_defs, selection) = match op {
        OperationDefinition::SelectionSet(s) => (&[][..], s),
        OperationDefinition::Query(qy) => (&qy.variable_definitions[..], &qy.selection_set),
        OperationDefinition::Mutation(_) => {
            return Err(vec![GraphqlError::new(
                "Schema is not configured for mutations",
            )])
        }
        OperationDefinition::Subscription(_) => {
            return Err(vec![GraphqlError::new(
                "Schema is not configured for subscriptions",
            )])
        }
    };
    let mut errors = Vec::new();
    let mut vars = Map::new();
    for vd in var_defs {
        let ty = TypeRef::from_ast(&vd.var_type);
        let given = variables.get(&vd.name).cloned();
        let value = match (given, &vd.default_value) {
            (Some(v), _) => v,
            (None, Some(d)) => const_to_json(d),
            (None, None) => Value::Null,
        };
        match coerce_json(schema, &value, &ty) {
            Ok(v) => {
                vars.insert(vd.name.clone(), v);
            }
            Err(explanation) => errors.push(
                GraphqlError::new(format!(
                    "Variable ${} of type {ty} was provided invalid value",
                    vd.name
                ))
                .at(vd.position)
                .ext(
                    json!({"value": value, "problems": [{"path": [], "explanation": explanation}]}),
                ),
            ),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let declared: HashSet<&str> = var_defs.iter().map(|v| v.name.as_str()).collect();
    let mut cx = Cx {
        schema,
        fragments: &fragments,
        vars: &vars,
        declared: &declared,
        op_name: op_name(op).unwrap_or("anonymous").to_string(),
        errors: Vec::new(),
        spreading: Vec::new(),
    };
    let fields = cx.collect("Query", selection);
    if cx.errors.is_empty() {
        Ok(fields)
    } else {
        Err(cx.errors)
    }
}

fn op_name<'a>(op: &'a OperationDefinition<'_, String>) -> Option<&'a str> {
    match op {
        OperationDefinition::Query(q) => q.name.as_deref(),
        OperationDefinition::Mutation(m) => m.name.as_deref(),
        OperationDefinition::Subscription(s) => s.name.as_deref(),
        OperationDefinition::SelectionSet(_) => None,
    }
}

/// graphql-parser reports `query parse error: Parse error at 1:12\nUnexpected ...`.
fn parse_error(e: &q::ParseError) -> GraphqlError {
    let text = e.to_string();
    let text = text.strip_prefix("query parse error: ").unwrap_or(&text);
    let mut err = GraphqlError::new(text.replace('\n', "; ").trim_end_matches("; ").to_string());
    if let Some(rest) = text.split("at ").nth(1) {
        let pos: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ':')
            .collect();
        if let Some((l, c)) = pos.split_once(':') {
            if let (Ok(l), Ok(c)) = (l.parse(), c.parse()) {
                err.locations.push((l, c));
            }
        }
    }
    err
}

struct Cx<'s, 'q> {
    schema: &'s Schema,
    fragments: &'s HashMap<&'q str, &'q FragmentDefinition<'q, String>>,
    vars: &'s Map<String, Value>,
    declared: &'s HashSet<&'s str>,
    op_name: String,
    errors: Errors,
    spreading: Vec<String>,
}

impl<'s, 'q> Cx<'s, 'q> {
    fn skipped(&mut self, directives: &[q::Directive<'q, String>]) -> bool {
        for d in directives {
            let want = match d.name.as_str() {
                "skip" => true,
                "include" => false,
                _ => continue,
            };
            let cond = d.arguments.iter().find(|(n, _)| n == "if").map(|(_, v)| {
                self.literal(
                    v,
                    &TypeRef::NonNull(Box::new(TypeRef::Named("Boolean".into()))),
                )
            });
            match cond {
                Some(Ok(Value::Bool(b))) if b == want => return true,
                Some(Ok(Value::Bool(_))) => {}
                _ => {
                    self.errors.push(
                        GraphqlError::new(format!(
                            "Directive '@{}' is missing required arguments: if",
                            d.name
                        ))
                        .at(d.position),
                    );
                }
            }
        }
        false
    }

    /// Flattens a selection set on `type_name` into fields, merged by response key.
    fn collect(&mut self, type_name: &str, set: &'q SelectionSet<'q, String>) -> Vec<Field> {
        let mut out: Vec<Field> = Vec::new();
        self.collect_into(type_name, set, &mut out);
        out
    }

    fn collect_into(
        &mut self,
        type_name: &str,
        set: &'q SelectionSet<'q, String>,
        out: &mut Vec<Field>,
    ) {
        for item in &set.items {
            match item {
                Selection::Field(f) => {
                    if self.skipped(&f.directives) {
                        continue;
                    }
                    if let Some(field) = self.field(type_name, f) {
                        merge(out, field, &mut self.errors);
                    }
                }
                Selection::InlineFragment(frag) => {
                    if self.skipped(&frag.directives) {
                        continue;
                    }
                    if let Some(TypeCondition::On(cond)) = &frag.type_condition {
                        if !self.condition_ok(cond, type_name, frag.position) {
                            continue;
                        }
                    }
                    self.collect_into(type_name, &frag.selection_set, out);
                }
                Selection::FragmentSpread(spread) => {
                    if self.skipped(&spread.directives) {
                        continue;
                    }
                    let name = spread.fragment_name.as_str();
                    let Some(frag) = self.fragments.get(name).copied() else {
                        self.errors.push(
                            GraphqlError::new(format!("Fragment {name} was used, but not defined"))
                                .at(spread.position)
                                .ext(json!({"code": "useAndDefineFragment", "fragmentName": name})),
                        );
                        continue;
                    };
                    if self.spreading.iter().any(|n| n == name) {
                        self.errors.push(
                            GraphqlError::new(format!("Fragment {name} contains an infinite loop"))
                                .at(spread.position)
                                .ext(json!({"code": "infiniteLoop", "fragmentName": name})),
                        );
                        continue;
                    }
                    let TypeCondition::On(cond) = &frag.type_condition;
                    if !self.condition_ok(cond, type_name, spread.position) {
                        continue;
                    }
                    self.spreading.push(name.to_string());
                    self.collect_into(type_name, &frag.selection_set, out);
                    self.spreading.pop();
                }
            }
        }
    }

    fn condition_ok(&mut self, cond: &str, type_name: &str, pos: graphql_parser::Pos) -> bool {
        if !self.schema.is_object(cond) && !self.schema.is_leaf(cond) {
            self.errors.push(
                GraphqlError::new(format!(
                    "No such type {cond}, so it can't be a fragment condition"
                ))
                .at(pos)
                .ext(json!({"code": "undefinedType", "typeName": cond})),
            );
            return false;
        }
        if cond != type_name {
            self.errors.push(
                GraphqlError::new(format!(
                    "Fragment on {cond} can't be spread inside {type_name}"
                ))
                .at(pos)
                .ext(json!({"code": "fragmentSpreadTypeMismatch", "typeName": cond})),
            );
            return false;
        }
        true
    }

    fn field(&mut self, type_name: &str, f: &'q q::Field<'q, String>) -> Option<Field> {
        let key = f.alias.clone().unwrap_or_else(|| f.name.clone());
        if f.name == "__typename" {
            return Some(Field {
                key,
                name: f.name.clone(),
                args: Map::new(),
                ty: None,
                selection: Vec::new(),
                line: f.position.line,
                column: f.position.column,
            });
        }
        if f.name == "__schema" || f.name == "__type" {
            self.errors.push(
                GraphqlError::new("Introspection is not served by this endpoint").at(f.position),
            );
            return None;
        }
        let Some(def) = self.schema.field(type_name, &f.name) else {
            self.errors.push(
                GraphqlError::new(format!(
                    "Field '{}' doesn't exist on type '{type_name}'",
                    f.name
                ))
                .at(f.position)
                .ext(json!({"code": "undefinedField", "typeName": type_name, "fieldName": f.name})),
            );
            return None;
        };
        let mut args = Map::new();
        for (name, value) in &f.arguments {
            let Some((_, arg)) = def.args.iter().find(|(n, _)| n == name) else {
                self.errors.push(
                    GraphqlError::new(format!(
                        "Field '{}' doesn't accept argument '{name}'",
                        f.name
                    ))
                    .at(f.position)
                    .ext(json!({"code": "argumentNotAccepted", "name": f.name, "typeName": "Field", "argumentName": name})),
                );
                continue;
            };
            match self.literal(value, &arg.ty) {
                Ok(v) => {
                    args.insert(name.clone(), v);
                }
                Err(()) => self.errors.push(
                    GraphqlError::new(format!(
                        "Argument '{name}' on Field '{}' has an invalid value ({value}). Expected type '{}'.",
                        f.name, arg.ty
                    ))
                    .at(f.position)
                    .ext(json!({"code": "argumentLiteralsIncompatible", "typeName": "Field", "argumentName": name})),
                ),
            }
        }
        let mut missing = Vec::new();
        for (name, arg) in &def.args {
            if !args.contains_key(name) {
                if let Some(d) = &arg.default {
                    args.insert(name.clone(), d.clone());
                } else if matches!(arg.ty, TypeRef::NonNull(_)) {
                    missing.push(name.clone());
                }
            }
        }
        if !missing.is_empty() {
            self.errors.push(
                GraphqlError::new(format!(
                    "Field '{}' is missing required arguments: {}",
                    f.name,
                    missing.join(", ")
                ))
                .at(f.position),
            );
        }
        let base = def.ty.base().to_string();
        let has_selection = !f.selection_set.items.is_empty();
        let selection = if self.schema.is_object(&base) {
            if !has_selection {
                self.errors.push(
                    GraphqlError::new(format!(
                        "Field must have selections (field '{}' returns {base} but has no selections. Did you mean '{} {{ ... }}'?)",
                        f.name, f.name
                    ))
                    .at(f.position)
                    .ext(json!({"code": "selectionMismatch", "nodeName": format!("field '{}'", f.name), "typeName": base})),
                );
                return None;
            }
            self.collect(&base, &f.selection_set)
        } else {
            if has_selection {
                let names: Vec<String> = f
                    .selection_set
                    .items
                    .iter()
                    .filter_map(|s| match s {
                        Selection::Field(x) => Some(x.name.clone()),
                        _ => None,
                    })
                    .collect();
                self.errors.push(
                    GraphqlError::new(format!(
                        "Selections can't be made on scalars (field '{}' returns {base} but has selections [{}])",
                        f.name,
                        names.join(", ")
                    ))
                    .at(f.position)
                    .ext(json!({"code": "selectionMismatch", "nodeName": format!("field '{}'", f.name), "typeName": base})),
                );
                return None;
            }
            Vec::new()
        };
        Some(Field {
            key,
            name: f.name.clone(),
            args,
            ty: Some(def.ty.clone()),
            selection,
            line: f.position.line,
            column: f.position.column,
        })
    }

    /// Coerces an argument literal (variables substituted) to an input type.
    fn literal(&mut self, v: &q::Value<'q, String>, ty: &TypeRef) -> Result<Value, ()> {
        if let q::Value::Variable(name) = v {
            if !self.declared.contains(name.as_str()) {
                self.errors.push(
                    GraphqlError::new(format!(
                        "Variable ${name} is used by {} but not declared",
                        self.op_name
                    ))
                    .ext(json!({"code": "variableNotDefined", "variableName": name})),
                );
                return Ok(Value::Null);
            }
            let value = self.vars.get(name).cloned().unwrap_or(Value::Null);
            if value.is_null() && matches!(ty, TypeRef::NonNull(_)) {
                return Err(());
            }
            return Ok(value);
        }
        match ty {
            TypeRef::NonNull(inner) => match v {
                q::Value::Null => Err(()),
                _ => self.literal(v, inner),
            },
            TypeRef::List(inner) => match v {
                q::Value::Null => Ok(Value::Null),
                q::Value::List(items) => items
                    .iter()
                    .map(|i| self.literal(i, inner))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array),
                single => Ok(Value::Array(vec![self.literal(single, inner)?])),
            },
            TypeRef::Named(name) => {
                if matches!(v, q::Value::Null) {
                    return Ok(Value::Null);
                }
                if let Some(values) = self.schema.enums.get(name) {
                    return match v {
                        q::Value::Enum(e) if values.contains(e) => Ok(json!(e)),
                        _ => Err(()),
                    };
                }
                match (name.as_str(), v) {
                    ("Int", q::Value::Int(n)) => {
                        let n = n.as_i64().ok_or(())?;
                        i32::try_from(n).map(|n| json!(n)).map_err(|_| ())
                    }
                    ("Float", q::Value::Int(n)) => Ok(json!(n.as_i64().ok_or(())? as f64)),
                    ("Float", q::Value::Float(f)) => Ok(json!(f)),
                    (
                        "String" | "Cursor" | "ISO8601Date" | "ISO8601DateTime",
                        q::Value::String(s),
                    ) => Ok(json!(s)),
                    ("ID", q::Value::String(s)) => Ok(json!(s)),
                    ("ID", q::Value::Int(n)) => Ok(json!(n.as_i64().ok_or(())?.to_string())),
                    ("Boolean", q::Value::Boolean(b)) => Ok(json!(b)),
                    ("JSON", other) => Ok(const_to_json(other)),
                    _ => Err(()),
                }
            }
        }
    }
}

/// Input coercion of a variable's JSON value.
fn coerce_json(schema: &Schema, v: &Value, ty: &TypeRef) -> Result<Value, String> {
    match ty {
        TypeRef::NonNull(inner) => {
            if v.is_null() {
                Err("Expected value to not be null".into())
            } else {
                coerce_json(schema, v, inner)
            }
        }
        TypeRef::List(inner) => match v {
            Value::Null => Ok(Value::Null),
            Value::Array(items) => items
                .iter()
                .map(|i| coerce_json(schema, i, inner))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            single => Ok(Value::Array(vec![coerce_json(schema, single, inner)?])),
        },
        TypeRef::Named(name) => {
            if v.is_null() {
                return Ok(Value::Null);
            }
            let bad = || format!("Could not coerce value {v} to {name}");
            if let Some(values) = schema.enums.get(name) {
                return match v.as_str() {
                    Some(s) if values.contains(s) => Ok(v.clone()),
                    _ => Err(bad()),
                };
            }
            match name.as_str() {
                "Int" => v
                    .as_i64()
                    .filter(|n| i32::try_from(*n).is_ok())
                    .map(|n| json!(n))
                    .ok_or_else(bad),
                "Float" => v.as_f64().map(|n| json!(n)).ok_or_else(bad),
                "Boolean" => v.as_bool().map(|b| json!(b)).ok_or_else(bad),
                "ID" => match v {
                    Value::String(_) => Ok(v.clone()),
                    Value::Number(n) if n.is_i64() || n.is_u64() => Ok(json!(n.to_string())),
                    _ => Err(bad()),
                },
                "JSON" => Ok(v.clone()),
                _ => v.as_str().map(|s| json!(s)).ok_or_else(bad),
            }
        }
    }
}

/// Merges a field into the collected list by response key (same name and arguments required).
fn merge(out: &mut Vec<Field>, field: Field, errors: &mut Errors) {
    if let Some(existing) = out.iter_mut().find(|f| f.key == field.key) {
        if existing.name != field.name || existing.args != field.args {
            errors.push(
                GraphqlError::new(format!(
                    "Field '{}' has a field conflict: {} or {}?",
                    field.key, existing.name, field.name
                ))
                .ext(json!({"code": "fieldConflict", "fieldName": field.key})),
            );
            return;
        }
        for child in field.selection {
            merge(&mut existing.selection, child, errors);
        }
    } else {
        out.push(field);
    }
}

/// Nesting depth, as graphql-ruby's `max_depth` counts it (`__typename` does not add a level).
pub fn depth(fields: &[Field]) -> usize {
    fields
        .iter()
        .filter(|f| f.ty.is_some())
        .map(|f| 1 + depth(&f.selection))
        .max()
        .unwrap_or(0)
}

/// Complexity as graphql-ruby computes it: each field costs 1 plus its children; on a
/// `...Connection` field, `edges` and `nodes` are multiplied by `first` or `last`, or by
/// `default_page_size` when neither is given, while `page_info` and `total_count` are not.
pub fn complexity(fields: &[Field], default_page_size: u64) -> u64 {
    fields
        .iter()
        .map(|f| {
            let is_connection =
                f.ty.as_ref()
                    .is_some_and(|t| t.base().ends_with("Connection"));
            if !is_connection {
                return 1 + complexity(&f.selection, default_page_size);
            }
            let page = ["first", "last"]
                .iter()
                .filter_map(|a| f.arg(a).and_then(Value::as_u64))
                .max()
                .unwrap_or(default_page_size);
            let (items, meta): (Vec<Field>, Vec<Field>) = f
                .selection
                .iter()
                .cloned()
                .partition(|c| c.name == "edges" || c.name == "nodes");
            1 + complexity(&meta, default_page_size)
                + page.saturating_mul(complexity(&items, default_page_size))
        })
        .fold(0u64, u64::saturating_add)
}

/// Response data, keeping the request's field order when serialized.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Null,
    Leaf(Value),
    List(Vec<Out>),
    Object(Vec<(String, Out)>),
}

impl Out {
    /// The same data as a `serde_json::Value` (key order then follows serde_json's map).
    pub fn to_value(&self) -> Value {
        match self {
            Out::Null => Value::Null,
            Out::Leaf(v) => v.clone(),
            Out::List(items) => Value::Array(items.iter().map(Out::to_value).collect()),
            Out::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_value()))
                    .collect(),
            ),
        }
    }
}

impl Serialize for Out {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Out::Null => serializer.serialize_none(),
            Out::Leaf(v) => v.serialize(serializer),
            Out::List(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for i in items {
                    seq.serialize_element(i)?;
                }
                seq.end()
            }
            Out::Object(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (k, v) in fields {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// Projects the selection out of a stored JSON object of type `type_name`. Fields the object
/// does not hold come out as null; field arguments below the root are accepted and ignored.
pub fn project(value: &Value, type_name: &str, fields: &[Field]) -> Out {
    if value.is_null() {
        return Out::Null;
    }
    Out::Object(
        fields
            .iter()
            .map(|f| {
                let out = match &f.ty {
                    None => Out::Leaf(json!(type_name)),
                    Some(ty) => project_typed(value.get(&f.name).unwrap_or(&Value::Null), ty, f),
                };
                (f.key.clone(), out)
            })
            .collect(),
    )
}

fn project_typed(v: &Value, ty: &TypeRef, f: &Field) -> Out {
    match (ty.nullable(), v) {
        (_, Value::Null) => Out::Null,
        (TypeRef::List(inner), Value::Array(items)) => {
            Out::List(items.iter().map(|i| project_typed(i, inner, f)).collect())
        }
        (t, _) if !f.selection.is_empty() => project(v, t.base(), &f.selection),
        _ => Out::Leaf(v.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDL: &str = "type Query { user(id: ID, flag: Boolean = true): User users(first: Int, after: String): UserConnection! }
        type User { id: ID! first_name: String location: Location locations: [Location!] }
        type Location { id: ID! city: String }
        type UserConnection { nodes: [User] page_info: PageInfo! total_count: Int! }
        type PageInfo { has_next_page: Boolean! }";

    fn schema() -> Schema {
        Schema::parse(SDL).unwrap()
    }

    #[test]
    fn fragments_aliases_and_directives_are_flattened() {
        let q = "query Q($skip: Boolean!) { a: user(id: 1) { ...F id @skip(if: $skip) ... on User { location { city } } } }
                 fragment F on User { first_name __typename }";
        let vars = json!({"skip": true});
        let fields = prepare(&schema(), q, vars.as_object().unwrap(), None).unwrap();
        assert_eq!(fields[0].key, "a");
        assert_eq!(fields[0].args["id"], json!("1"));
        assert_eq!(fields[0].args["flag"], json!(true));
        let keys: Vec<_> = fields[0].selection.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["first_name", "__typename", "location"]);
    }

    #[test]
    fn unknown_fields_and_arguments_use_graphql_ruby_messages() {
        let errs = prepare(
            &schema(),
            "{ user(id: 1, nope: 2) { id ssn } }",
            &Map::new(),
            None,
        )
        .unwrap_err();
        let messages: Vec<_> = errs.iter().map(|e| e.message.as_str()).collect();
        assert!(messages.contains(&"Field 'user' doesn't accept argument 'nope'"));
        assert!(messages.contains(&"Field 'ssn' doesn't exist on type 'User'"));
    }

    #[test]
    fn connection_complexity_multiplies_items_by_page_size() {
        let f = prepare(
            &schema(),
            "{ users(first: 10) { total_count page_info { has_next_page } nodes { id first_name } } }",
            &Map::new(),
            None,
        )
        .unwrap();
        // 1 (users) + 1 (total_count) + 2 (page_info) + 10 * 3 (nodes)
        assert_eq!(complexity(&f, 100), 34);
        assert_eq!(depth(&f), 3);
    }

    #[test]
    fn projection_keeps_request_order_and_nulls_missing_fields() {
        let f = prepare(
            &schema(),
            "{ user { z: first_name id locations { city } location { id } } }",
            &Map::new(),
            None,
        )
        .unwrap();
        let user = json!({"id": "7", "first_name": "Ana", "locations": [{"id": "1", "city": "Austin"}], "extra": 1});
        let out = project(&user, "User", &f[0].selection);
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"z":"Ana","id":"7","locations":[{"city":"Austin"}],"location":null}"#
        );
    }

    #[test]
    fn depth_counts_nested_fields() {
        let schema = Schema::parse("type Query { n: N } type N { n: N id: ID }").unwrap();
        let query = format!("{{ {} id {} }}", "n {".repeat(30), "}".repeat(30));
        let fields = prepare(&schema, &query, &Map::new(), None).unwrap();
        assert_eq!(depth(&fields), 31);
    }

    #[test]
    fn mutations_and_missing_variables_are_refused() {
        let errs = prepare(&schema(), "mutation { user { id } }", &Map::new(), None).unwrap_err();
        assert_eq!(errs[0].message, "Schema is not configured for mutations");
        let errs = prepare(
            &schema(),
            "query($id: ID!) { user(id: $id) { id } }",
            &Map::new(),
            None,
        )
        .unwrap_err();
        assert_eq!(
            errs[0].message,
            "Variable $id of type ID! was provided invalid value"
        );
    }
}
