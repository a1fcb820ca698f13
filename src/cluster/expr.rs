//! Update and condition expressions of the lease table's writes.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use super::lease::{n, s, CHECKPOINT_OWNER, LEASE_COUNTER, LEASE_KEY, LEASE_OWNER};

/// An update and its condition's placeholders: `#attr` for each attribute
/// name (so no attribute clashes with a DynamoDB reserved word) and `:attr`
/// or `:was_attr` for values.
#[derive(Default)]
pub(crate) struct Expr {
    set: Vec<String>,
    remove: Vec<String>,
    pub(crate) names: HashMap<String, String>,
    pub(crate) values: HashMap<String, AttributeValue>,
}

impl Expr {
    fn name(&mut self, attr: &str) -> String {
        let placeholder = format!("#{attr}");
        self.names.insert(placeholder.clone(), attr.to_owned());
        placeholder
    }

    fn value(&mut self, key: &str, value: AttributeValue) -> String {
        let placeholder = format!(":{key}");
        self.values.insert(placeholder.clone(), value);
        placeholder
    }

    pub(crate) fn set(&mut self, attr: &str, value: AttributeValue) {
        let (name, value) = (self.name(attr), self.value(attr, value));
        self.set.push(format!("{name} = {value}"));
    }

    /// `attr + 1`, counting a missing attribute as 0 (KCL's `ADD 1`).
    pub(crate) fn increment(&mut self, attr: &str) {
        let name = self.name(attr);
        let (zero, one) = (self.value("zero", n(0)), self.value("one", n(1)));
        self.set
            .push(format!("{name} = if_not_exists({name}, {zero}) + {one}"));
    }

    pub(crate) fn remove(&mut self, attr: &str) {
        let name = self.name(attr);
        self.remove.push(name);
    }

    pub(crate) fn update_expression(&self) -> String {
        let mut out = String::new();
        if !self.set.is_empty() {
            out = format!("SET {}", self.set.join(", "));
        }
        if !self.remove.is_empty() {
            out = format!("{out} REMOVE {}", self.remove.join(", "));
        }
        out.trim_start().to_owned()
    }

    pub(crate) fn counter_is(&mut self, counter: u64) -> String {
        let name = self.name(LEASE_COUNTER);
        let value = self.value("was_counter", n(counter));
        format!("{name} = {value}")
    }

    /// `worker` holds the lease: it is the old owner of a pending handoff,
    /// or the owner when none is pending.
    pub(crate) fn held_by(&mut self, worker: &str) -> String {
        let (owner, cp_owner) = (self.name(LEASE_OWNER), self.name(CHECKPOINT_OWNER));
        let me = self.value("me", s(worker));
        format!("((attribute_not_exists({cp_owner}) AND {owner} = {me}) OR {cp_owner} = {me})")
    }

    /// `attr` has the value read, or is absent as read.
    pub(crate) fn field_is(&mut self, attr: &str, value: Option<&str>) -> String {
        let name = self.name(attr);
        match value {
            Some(v) => {
                let value = self.value(&format!("was_{attr}"), s(v));
                format!("{name} = {value}")
            }
            None => format!("attribute_not_exists({name})"),
        }
    }

    /// The row exists: without it, an update would create a lease from
    /// nothing but the attributes it sets.
    pub(crate) fn exists(&mut self) -> String {
        let name = self.name(LEASE_KEY);
        format!("attribute_exists({name})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_and_removes_share_one_expression() {
        let mut e = Expr::default();
        let cond = format!("{} AND {}", e.counter_is(3), e.exists());
        e.set(LEASE_OWNER, s("me"));
        e.increment(LEASE_COUNTER);
        e.remove(CHECKPOINT_OWNER);
        assert_eq!(
            cond,
            "#leaseCounter = :was_counter AND attribute_exists(#leaseKey)"
        );
        assert_eq!(
            e.update_expression(),
            "SET #leaseOwner = :leaseOwner, \
             #leaseCounter = if_not_exists(#leaseCounter, :zero) + :one REMOVE #checkpointOwner"
        );
        assert_eq!(e.names.len(), 4);
        assert_eq!(e.values.len(), 4);
        let mut only_remove = Expr::default();
        only_remove.remove(LEASE_OWNER);
        assert_eq!(only_remove.update_expression(), "REMOVE #leaseOwner");
    }
}
