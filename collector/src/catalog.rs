//! The catalog: every table's columns and their kinds. It only grows (schema evolution adds columns); a column that
//! arrives with another kind or type than it already has is rejected with a message naming both.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::datatypes::{Field as ArrowField, Schema, SchemaRef};
use damselfly_proto::v1::WriteBatch;

use crate::model::{
    ColumnKind, FieldType, TIME_COLUMN, chunk_common_tags, tag_data_type, time_data_type,
};

/// One table's columns.
#[derive(Debug, Clone, Default)]
pub struct TableSchema {
    columns: BTreeMap<String, ColumnKind>,
}

impl TableSchema {
    pub fn get(&self, name: &str) -> Option<ColumnKind> {
        self.columns.get(name).copied()
    }

    pub fn columns(&self) -> impl Iterator<Item = (&str, ColumnKind)> {
        self.columns.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// The Arrow schema: `time`, then tags by name, then fields by name. Deterministic, so every snapshot and
    /// file of a table lines up.
    pub fn arrow_schema(&self) -> SchemaRef {
        let mut fields = vec![ArrowField::new(TIME_COLUMN, time_data_type(), false)];
        for (name, kind) in &self.columns {
            if *kind == ColumnKind::Tag {
                fields.push(ArrowField::new(name, tag_data_type(), true));
            }
        }
        for (name, kind) in &self.columns {
            if let ColumnKind::Field(t) = kind {
                fields.push(ArrowField::new(name, t.data_type(), true));
            }
        }
        Arc::new(Schema::new(fields))
    }

    /// Builds a table schema from a file's Arrow schema (used when loading the store at start-up).
    pub fn from_arrow(schema: &Schema) -> Result<TableSchema, String> {
        let mut columns = BTreeMap::new();
        for field in schema.fields() {
            if field.name() == TIME_COLUMN {
                continue;
            }
            let kind = if *field.data_type() == tag_data_type() {
                ColumnKind::Tag
            } else if let Some(t) = FieldType::from_data_type(field.data_type()) {
                ColumnKind::Field(t)
            } else {
                return Err(format!(
                    "column {:?} has unsupported type {}",
                    field.name(),
                    field.data_type()
                ));
            };
            columns.insert(field.name().clone(), kind);
        }
        Ok(TableSchema { columns })
    }
}

/// All tables.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    tables: BTreeMap<String, TableSchema>,
}

/// A column whose kind conflicts with what the table already has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "column {column:?} of table {table:?} is a {existing} but this write sends it as a {incoming}; types never change, use a new column name"
)]
pub struct SchemaConflict {
    pub table: String,
    pub column: String,
    pub existing: ColumnKind,
    pub incoming: ColumnKind,
}

impl Catalog {
    pub fn table(&self, name: &str) -> Option<&TableSchema> {
        self.tables.get(name)
    }

    pub fn table_names(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    /// Adds one column, or confirms it is already there with the same kind.
    pub fn add_column(
        &mut self,
        table: &str,
        column: &str,
        kind: ColumnKind,
    ) -> Result<(), SchemaConflict> {
        let schema = self.tables.entry(table.to_string()).or_default();
        match schema.columns.get(column) {
            Some(existing) if *existing != kind => Err(SchemaConflict {
                table: table.to_string(),
                column: column.to_string(),
                existing: *existing,
                incoming: kind,
            }),
            Some(_) => Ok(()),
            None => {
                schema.columns.insert(column.to_string(), kind);
                Ok(())
            }
        }
    }

    /// Merges a whole table schema (from a Parquet file) into the catalog.
    pub fn merge_table(&mut self, table: &str, schema: &TableSchema) -> Result<(), SchemaConflict> {
        for (column, kind) in schema.columns() {
            self.add_column(table, column, kind)?;
        }
        Ok(())
    }

    /// Records every column of an already-checked batch. A conflict here (possible only when replaying a WAL
    /// against files that disagree) is returned so the caller can skip the batch loudly.
    pub fn apply_batch(&mut self, batch: &WriteBatch) -> Result<(), SchemaConflict> {
        for (table, column, kind) in batch_columns(batch) {
            self.add_column(table, column, kind)?;
        }
        Ok(())
    }

    /// Checks a batch against the catalog plus `overlay` (columns added by earlier batches of the same group
    /// commit) and records its new columns in `overlay`. Nothing in `self` changes.
    pub fn check_batch(
        &self,
        batch: &WriteBatch,
        overlay: &mut HashMap<(String, String), ColumnKind>,
    ) -> Result<(), SchemaConflict> {
        let mut added: Vec<((String, String), ColumnKind)> = Vec::new();
        let mut check =
            |table: &str, column: &str, kind: ColumnKind| -> Result<(), SchemaConflict> {
                let existing = self
                    .tables
                    .get(table)
                    .and_then(|t| t.get(column))
                    .or_else(|| {
                        overlay
                            .get(&(table.to_string(), column.to_string()))
                            .copied()
                    })
                    .or_else(|| {
                        added
                            .iter()
                            .find(|((t, c), _)| t == table && c == column)
                            .map(|(_, k)| *k)
                    });
                match existing {
                    Some(existing) if existing != kind => Err(SchemaConflict {
                        table: table.to_string(),
                        column: column.to_string(),
                        existing,
                        incoming: kind,
                    }),
                    Some(_) => Ok(()),
                    None => {
                        added.push(((table.to_string(), column.to_string()), kind));
                        Ok(())
                    }
                }
            };
        for (table, column, kind) in batch_columns(batch) {
            check(table, column, kind)?;
        }
        overlay.extend(added);
        Ok(())
    }
}

/// Every (table, column, kind) a normalized batch (rows in chunks, see `model::normalize`) writes, common tags
/// included. Column names repeat across chunks of one table; callers dedupe through the catalog.
fn batch_columns(batch: &WriteBatch) -> impl Iterator<Item = (&str, &str, ColumnKind)> {
    batch.chunks.iter().flat_map(move |chunk| {
        let table = chunk.measurement.as_str();
        let tags = chunk_common_tags(chunk, &batch.common_tags)
            .map(|t| t.key.as_str())
            .chain(chunk.tag_keys.iter().map(String::as_str))
            .map(move |name| (table, name, ColumnKind::Tag));
        let fields = chunk.fields.iter().filter_map(move |column| {
            let kind = FieldType::of_column(column)?;
            Some((table, column.key.as_str(), ColumnKind::Field(kind)))
        });
        tags.chain(fields)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use damselfly_proto::v1::{Field, Point, Tag, field::Value};

    fn batch(field_value: Value, tag: &str) -> WriteBatch {
        let mut b = WriteBatch {
            chunks: Vec::new(),
            agent_id: "a".into(),
            seq: 1,
            common_tags: vec![Tag {
                key: "host".into(),
                value: "h".into(),
            }],
            points: vec![Point {
                measurement: "m".into(),
                tags: vec![Tag {
                    key: tag.into(),
                    value: "x".into(),
                }],
                fields: vec![Field {
                    key: "v".into(),
                    value: Some(field_value),
                }],
                time_unix_nano: 1,
            }],
        };
        crate::model::normalize(&mut b).expect("normalize");
        b
    }

    #[test]
    fn conflicting_types_name_column_and_both_types() {
        let mut catalog = Catalog::default();
        catalog
            .add_column("m", "v", ColumnKind::Field(FieldType::F64))
            .expect("first");
        let mut overlay = HashMap::new();
        let err = catalog
            .check_batch(&batch(Value::I64(1), "t"), &mut overlay)
            .expect_err("conflict");
        let msg = err.to_string();
        assert!(
            msg.contains("\"v\"") && msg.contains("float field") && msg.contains("integer field"),
            "{msg}"
        );
    }

    #[test]
    fn overlay_catches_conflicts_within_one_group() {
        let catalog = Catalog::default();
        let mut overlay = HashMap::new();
        catalog
            .check_batch(&batch(Value::F64(1.0), "t"), &mut overlay)
            .expect("first");
        let err = catalog
            .check_batch(&batch(Value::Bool(true), "t"), &mut overlay)
            .expect_err("second conflicts with the first");
        assert_eq!(err.existing, ColumnKind::Field(FieldType::F64));
    }

    #[test]
    fn schema_orders_time_tags_fields() {
        let mut catalog = Catalog::default();
        catalog.add_column("m", "z", ColumnKind::Tag).expect("z");
        catalog
            .add_column("m", "a", ColumnKind::Field(FieldType::F64))
            .expect("a");
        catalog.add_column("m", "b", ColumnKind::Tag).expect("b");
        let schema = catalog.table("m").expect("m").arrow_schema();
        let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["time", "b", "z", "a"]);
        let back = TableSchema::from_arrow(&schema).expect("round trip");
        assert_eq!(back.get("a"), Some(ColumnKind::Field(FieldType::F64)));
    }
}
