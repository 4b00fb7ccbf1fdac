//! DDL locks what it names: the relations a CREATE, ALTER, DROP, TRUNCATE, CREATE INDEX or
//! CREATE VIEW names (and the tables a foreign key, a LIKE or a view refers to) are locked in
//! Chorus's lock manager by name, not the cluster-wide lock, so two transactions creating
//! different tables go on side by side as on PostgreSQL, and a real conflict still orders.
//!
//! Names, not oids: a table being created has no oid yet, and a catalog loaded before another
//! session's DDL committed may lack it; writes lock the names of the tables they touch too
//! (`order::lock_set`), so DDL and writes of one table meet on one resource. What the analysis
//! cannot name keeps the cluster-wide lock: DO, functions, types, event triggers (and any DDL
//! while one is enabled), inheritance and partitions (DDL reaches relations it does not name),
//! CASCADE (it drops what depends on the names), indexes by their own name, RESTART IDENTITY.

use pg_query::protobuf::{self, node::Node as N};

use super::Stmt;
use crate::sql::lexer::{Lexer, Tok};

impl Stmt<'_> {
    /// A DDL statement: locked by the names it gives where it can be, else the cluster-wide lock.
    pub(super) fn ddl(&mut self, node: &N) {
        self.other();
        if let Some(why) = match node {
            N::AlterTableStmt(a) => self.uneven_fill(a),
            _ => None,
        } {
            self.refuse(&why);
        }
        let Some(cat) = self.cat else { return };
        if cat.event_triggers {
            return;
        }
        let Some(mut names) = named(node) else { return };
        let found = self.walk(node);
        names.extend(found.relations.into_iter().map(|(schema, name, _)| (schema, name)));
        let mut locked = Vec::with_capacity(names.len());
        for (schema, name) in names {
            if let Some(r) = cat.resolve(&schema, &name) {
                if r.has_children {
                    return; // inheritance or partitions: DDL reaches relations it does not name
                }
                // Foreign-key neighbours: PostgreSQL locks them too (their triggers change).
                for oid in r.parents.iter().chain(&r.children) {
                    locked.extend(cat.relation(*oid).map(|n| n.name.clone()));
                }
            }
            locked.push(name);
        }
        locked.sort();
        locked.dedup();
        self.out.global = false;
        self.out.names = locked;
    }
}

impl Stmt<'_> {
    /// An ALTER TABLE that fills the table's existing rows with values each backend computes on
    /// its own: ADD COLUMN with a default that is not the same everywhere (a time, random or
    /// other non-immutable function), or with a serial type or an identity (each backend numbers
    /// the rows in its own physical order), or ALTER COLUMN TYPE with such a USING. Every
    /// backend would accept it, and they would differ from then on.
    fn uneven_fill(&self, a: &protobuf::AlterTableStmt) -> Option<String> {
        use protobuf::{AlterTableType as At, ConstrType};
        for c in &a.cmds {
            let Some(N::AlterTableCmd(cmd)) = &c.node else { continue };
            let Some(N::ColumnDef(col)) = cmd.def.as_ref().and_then(|d| d.node.as_ref()) else { continue };
            if cmd.subtype == At::AtAlterColumnType as i32 {
                if let Some(f) = col.raw_default.as_deref().and_then(|e| self.not_the_same_everywhere(e)) {
                    return Some(format!(
                        "ALTER COLUMN {} TYPE ... USING {f} (each backend would convert the rows with its own value)",
                        cmd.name
                    ));
                }
                continue;
            }
            if cmd.subtype != At::AtAddColumn as i32 {
                continue;
            }
            let then = "add the column without it, then SET DEFAULT, then UPDATE the existing rows";
            let ty = col.type_name.as_ref().and_then(|t| t.names.last()).and_then(|n| match &n.node {
                Some(N::String(s)) => Some(s.sval.as_str()),
                _ => None,
            });
            if matches!(ty, Some("serial" | "serial2" | "serial4" | "serial8" | "smallserial" | "bigserial")) {
                return Some(format!(
                    "ADD COLUMN {} of a serial type (each backend would number the existing rows in its own physical order; {then})",
                    col.colname
                ));
            }
            for k in &col.constraints {
                let Some(N::Constraint(k)) = &k.node else { continue };
                if k.contype == ConstrType::ConstrIdentity as i32 {
                    return Some(format!(
                        "ADD COLUMN {} GENERATED AS IDENTITY (each backend would number the existing rows in its own physical order; {then})",
                        col.colname
                    ));
                }
                let default = (k.contype == ConstrType::ConstrDefault as i32).then_some(k.raw_expr.as_deref()).flatten();
                if let Some(f) = default.and_then(|e| self.not_the_same_everywhere(e)) {
                    return Some(format!(
                        "ADD COLUMN {} DEFAULT {f} (each backend would fill the existing rows with its own value; {then})",
                        col.colname
                    ));
                }
            }
        }
        None
    }

    /// What in an expression may differ from one backend to the next: a time keyword, or a
    /// function that is not immutable (unknown ones count as such).
    fn not_the_same_everywhere(&self, e: &protobuf::Node) -> Option<String> {
        let found = self.walk(e.node.as_ref()?);
        if found.value_functions.iter().any(|(op, _, _)| (1..=9).contains(op)) {
            return Some("CURRENT_TIMESTAMP (or another time keyword)".into());
        }
        let immutable = |name: &str| {
            self.cat.and_then(|c| c.function(name)).is_some_and(|(v, _)| v == crate::sql::catalog::Volatility::Immutable)
        };
        found.calls.iter().find(|(name, _, _)| !immutable(name)).map(|(name, _, _)| format!("{name}()"))
    }
}

/// The (schema, name) pairs a DDL statement names outside its RangeVars (which the walk
/// finds), or None when it must take the cluster-wide lock.
fn named(node: &N) -> Option<Vec<(String, String)>> {
    use protobuf::{AlterTableType as At, DropBehavior, ObjectType as O};
    let cascade = |b: i32| b == DropBehavior::DropCascade as i32;
    let relation_kind = |t: i32| {
        [O::ObjectTable, O::ObjectSequence, O::ObjectView, O::ObjectMatview, O::ObjectForeignTable].iter().any(|k| *k as i32 == t)
    };
    match node {
        N::CreateStmt(c) if c.inh_relations.is_empty() && c.partbound.is_none() && c.of_typename.is_none() => Some(Vec::new()),
        N::CreateSeqStmt(_) | N::AlterSeqStmt(_) | N::ViewStmt(_) | N::IndexStmt(_) => Some(Vec::new()),
        N::AlterTableStmt(a) if relation_kind(a.objtype) => {
            let risky = [
                At::AtAddInherit,
                At::AtDropInherit,
                At::AtAttachPartition,
                At::AtDetachPartition,
                At::AtDetachPartitionFinalize,
            ];
            let plain = a.cmds.iter().all(|c| match &c.node {
                Some(N::AlterTableCmd(cmd)) => !cascade(cmd.behavior) && !risky.iter().any(|r| *r as i32 == cmd.subtype),
                _ => false,
            });
            plain.then(Vec::new)
        }
        N::TruncateStmt(t) if !cascade(t.behavior) && !t.restart_seqs => Some(Vec::new()),
        N::RenameStmt(r) if relation_kind(r.rename_type) || r.rename_type == O::ObjectColumn as i32 => {
            // The relation is a RangeVar; its new name, when it is the relation renamed, too.
            let rv = r.relation.as_ref()?;
            let renamed = relation_kind(r.rename_type).then(|| (rv.schemaname.clone(), r.newname.clone()));
            Some(renamed.into_iter().collect())
        }
        N::DropStmt(d) if relation_kind(d.remove_type) && !cascade(d.behavior) => {
            let mut out = Vec::new();
            for o in &d.objects {
                let Some(N::List(l)) = &o.node else { return None };
                let parts: Vec<&str> = l
                    .items
                    .iter()
                    .filter_map(|i| match &i.node {
                        Some(N::String(s)) => Some(s.sval.as_str()),
                        _ => None,
                    })
                    .collect();
                match parts.as_slice() {
                    [name] => out.push((String::new(), name.to_string())),
                    [schema, name] => out.push((schema.to_string(), name.to_string())),
                    _ => return None,
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// Whether every statement in `sql` starts with CREATE, ALTER, DROP or TRUNCATE: such a text
/// is analysed with the last catalog loaded instead of waiting for a current one (it is
/// locked by the names it gives; `CatalogSlot::names_lockable` says when that catalog serves).
pub fn ddl_only(sql: &[u8]) -> bool {
    let mut lx = Lexer::new(sql);
    let mut first = true;
    let mut any = false;
    while let Some((tok, s, e)) = lx.next_with_span() {
        match tok {
            Tok::Punct(b';') => first = true,
            Tok::Word(..) if first => {
                let w = &sql[s..e];
                if !["create", "alter", "drop", "truncate"].iter().any(|k| w.eq_ignore_ascii_case(k.as_bytes())) {
                    return false;
                }
                first = false;
                any = true;
            }
            _ if first => return false,
            _ => {}
        }
    }
    any
}
