//! Answers to the catalog queries `psql` sends for `\d`, `\dt [PATTERN]` and `\d[+] NAME`, recognised by their
//! shape and answered from the engine's tables (`datafusion.public`) and their schemas.
//!
//! DataFusion has no `pg_catalog`, and emulating it (regclass casts, `pg_table_is_visible`, `format_type`, ...)
//! is far larger than these few shapes. Columns are filled by their names in the query's select list, so the
//! `+` variants (more columns) work too. Tables get OIDs 16384, 16385, ... in name order, valid while the set of
//! tables does not change. Any other catalog query the engine cannot plan is answered with no rows (see
//! [`super`]).

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use super::{Answer, PgError};
use crate::query::QueryEngine;

/// OID of the first table; PostgreSQL's first user OID, so clients never take ours for a system object.
const FIRST_OID: u32 = 16_384;

/// Whether the statement reads PostgreSQL's catalog.
pub fn mentions_catalog(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    [
        "pg_catalog",
        "pg_class",
        "pg_namespace",
        "pg_attribute",
        "pg_type",
        "pg_database",
        "pg_settings",
    ]
    .iter()
    .any(|t| lower.contains(t))
}

/// An answer without columns or rows.
pub fn empty() -> Answer {
    Answer::Rows {
        schema: Arc::new(Schema::empty()),
        batches: Vec::new(),
    }
}

/// The answer to a known catalog query; `None` for any other statement.
pub async fn answer(engine: &QueryEngine, sql: &str) -> Option<Result<Answer, PgError>> {
    let lower = sql.to_ascii_lowercase();
    if !lower.contains("pg_catalog.pg_class c") && !lower.contains("pg_catalog.pg_attribute a") {
        return None;
    }
    let columns = select_list(sql)?;
    let run = async {
        let tables = tables(engine).await?;
        let rows: Vec<Vec<Option<String>>> =
            if lower.starts_with("select a.attname") && lower.contains("a.attrelid = '") {
                // `\d NAME`, its columns: name, type, default, not null, collation, identity, generated, ...
                let Some(table) =
                    quoted_after(&lower, "a.attrelid = '").and_then(|o| by_oid(&tables, &o))
                else {
                    return Ok(Vec::new());
                };
                let (_, schema) = engine
                    .describe(&format!("SELECT * FROM \"{}\"", table.replace('"', "\"\"")))
                    .await?;
                schema
                    .fields()
                    .iter()
                    .map(|f| {
                        (0..columns.len())
                            .map(|i| match i {
                                0 => Some(f.name().clone()),
                                1 => Some(super::types::type_name(f.data_type()).to_owned()),
                                3 => Some(if f.is_nullable() { "f" } else { "t" }.to_owned()),
                                5 | 6 => Some(String::new()),
                                // `\d+`: plain storage, as for fixed-size types.
                                _ if columns[i] == "attstorage" => Some("p".to_owned()),
                                _ => None,
                            })
                            .collect()
                    })
                    .collect()
            } else if lower.starts_with("select c.relchecks") && lower.contains("c.oid = '") {
                // `\d NAME`, the table's properties: an ordinary heap table with no constraints or indexes.
                let found = quoted_after(&lower, "c.oid = '").and_then(|o| by_oid(&tables, &o));
                if found.is_none() {
                    return Ok(Vec::new());
                }
                vec![
                    columns
                        .iter()
                        .map(|c| {
                            Some(
                                match c.as_str() {
                                    "relchecks" | "reltablespace" => "0",
                                    "relkind" => "r",
                                    "relpersistence" => "p",
                                    "relreplident" => "d",
                                    "amname" => "heap",
                                    c if c.starts_with("rel") => "f",
                                    _ => "",
                                }
                                .to_owned(),
                            )
                        })
                        .collect(),
                ]
            } else if lower.contains("as \"name\"")
                || lower.starts_with("select c.oid,")
                    && lower.contains("c.relname")
                    && lower.contains("operator(pg_catalog.~)")
            {
                // `\d NAME` looking the table up, or `\d` / `\dt` listing tables.
                let pattern = quoted_after(sql, "OPERATOR(pg_catalog.~) '");
                tables
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| pattern.as_deref().is_none_or(|p| matches_pattern(p, t)))
                    .map(|(i, t)| {
                        columns
                            .iter()
                            .map(|c| match c.to_ascii_lowercase().as_str() {
                                "oid" => Some((FIRST_OID + i as u32).to_string()),
                                "schema" | "nspname" => Some("public".to_owned()),
                                "name" | "relname" => Some(t.clone()),
                                "type" => Some("table".to_owned()),
                                "owner" => Some("damselfly".to_owned()),
                                "persistence" => Some("permanent".to_owned()),
                                "access method" => Some("heap".to_owned()),
                                _ => None,
                            })
                            .collect()
                    })
                    .collect()
            } else {
                return Ok(Vec::new());
            };
        Ok(rows)
    };
    let result: Result<Vec<Vec<Option<String>>>, PgError> = run.await;
    Some(result.and_then(|rows| text_answer(&columns, rows)))
}

/// An answer of text columns.
fn text_answer(columns: &[String], rows: Vec<Vec<Option<String>>>) -> Result<Answer, PgError> {
    let schema: SchemaRef = Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(c, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let arrays: Vec<ArrayRef> = (0..columns.len())
        .map(|i| {
            Arc::new(StringArray::from(
                rows.iter()
                    .map(|r| r.get(i).cloned().flatten())
                    .collect::<Vec<_>>(),
            )) as ArrayRef
        })
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), arrays)
        .map_err(|e| PgError::new("XX000", format!("cannot build a catalog answer: {e}")))?;
    Ok(Answer::Rows {
        schema,
        batches: vec![batch],
    })
}

/// The measurement tables, by name.
async fn tables(engine: &QueryEngine) -> Result<Vec<String>, PgError> {
    let result = engine
        .sql(
            // Sorted here, not with ORDER BY: a sort reserves memory, and listing tables should work even when
            // the query memory pool is small or busy.
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .await?;
    let mut names = Vec::new();
    for batch in &result.batches {
        let column = arrow::compute::cast(batch.column(0), &DataType::Utf8)
            .map_err(|e| PgError::new("XX000", e.to_string()))?;
        names.extend(
            column
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(str::to_owned),
        );
    }
    names.sort();
    Ok(names)
}

fn by_oid(tables: &[String], oid: &str) -> Option<String> {
    let i = oid.parse::<u32>().ok()?.checked_sub(FIRST_OID)?;
    tables.get(usize::try_from(i).ok()?).cloned()
}

/// The text of the string literal that follows `prefix`.
fn quoted_after(sql: &str, prefix: &str) -> Option<String> {
    let start = sql.find(prefix)? + prefix.len();
    let end = sql[start..].find('\'')?;
    Some(sql[start..start + end].to_owned())
}

/// Whether `name` matches psql's pattern regex (`^(cpu)$`, `^(cp.*)$`): only `.` and `.*` are wildcards here.
fn matches_pattern(pattern: &str, name: &str) -> bool {
    let p = pattern
        .strip_prefix("^(")
        .and_then(|p| p.strip_suffix(")$"))
        .unwrap_or(pattern);
    fn glob(p: &[u8], n: &[u8]) -> bool {
        match p {
            [] => n.is_empty(),
            [b'.', b'*', rest @ ..] => (0..=n.len()).any(|i| glob(rest, &n[i..])),
            [b'.', rest @ ..] => !n.is_empty() && glob(rest, &n[1..]),
            [c, rest @ ..] => n.first() == Some(c) && glob(rest, &n[1..]),
        }
    }
    glob(p.as_bytes(), name.as_bytes())
}

/// Output names of the top-level select list: the alias after `AS`, else the last name of the expression.
fn select_list(sql: &str) -> Option<Vec<String>> {
    let body = sql.trim_start().get(6..)?;
    let mut items = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut start = 0;
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < body.len() {
        let c = char::from(bytes[i]);
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' => quote = Some(c),
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&body[start..i]);
                    start = i + 1;
                }
                _ if depth == 0 && starts_with_from(&bytes[i..]) => {
                    items.push(&body[start..i]);
                    return Some(items.iter().map(|s| item_name(s)).collect());
                }
                _ => {}
            },
        }
        i += 1;
    }
    None
}

/// `FROM` after whitespace, as a word.
fn starts_with_from(b: &[u8]) -> bool {
    b.len() >= 6
        && b[0].is_ascii_whitespace()
        && b[1..5].eq_ignore_ascii_case(b"from")
        && b[5].is_ascii_whitespace()
}

fn item_name(item: &str) -> String {
    let item = item.trim();
    let lower = item.to_ascii_lowercase();
    if let Some(pos) = lower.rfind(" as ") {
        let alias = item[pos + 4..].trim();
        if !alias.contains(')') {
            return alias.trim_matches('"').to_owned();
        }
    }
    let expr = match item.find('(') {
        Some(p) if item.ends_with(')') => &item[..p],
        _ => item,
    };
    let name = expr.rsplit('.').next().unwrap_or(expr).trim();
    // PostgreSQL's name for an expression it cannot name.
    if name.is_empty() { "?column?" } else { name }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psql_list_names() {
        let sql = "SELECT n.nspname as \"Schema\",\n  c.relname as \"Name\",\n  CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' END as \"Type\",\n  pg_catalog.pg_get_userbyid(c.relowner) as \"Owner\"\nFROM pg_catalog.pg_class c";
        assert_eq!(
            select_list(sql),
            Some(vec![
                "Schema".into(),
                "Name".into(),
                "Type".into(),
                "Owner".into()
            ])
        );
        let sql = "SELECT a.attname,\n  pg_catalog.format_type(a.atttypid, a.atttypmod),\n  (SELECT 1 FROM x WHERE a = b),\n  a.attnotnull\nFROM pg_catalog.pg_attribute a";
        assert_eq!(
            select_list(sql),
            Some(vec![
                "attname".into(),
                "format_type".into(),
                "?column?".into(),
                "attnotnull".into()
            ])
        );
    }

    #[test]
    fn patterns() {
        assert!(matches_pattern("^(cpu)$", "cpu"));
        assert!(!matches_pattern("^(cpu)$", "cpu2"));
        assert!(matches_pattern("^(cp.*)$", "cpu2"));
        assert!(matches_pattern("^(c.u)$", "cpu"));
    }
}
