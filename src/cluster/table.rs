//! The lease table's operations: every write conditional on a copy read from
//! the table (which condition fences what: the module doc of `cluster`).

use std::future::Future;
use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{ReturnValue, ReturnValuesOnConditionCheckFailure};
use aws_sdk_dynamodb::Client;

use super::error::{verdict, LeaseError, Verdict, CONDITION_FAILED};
use super::expr::Expr;
use super::lease::*;
use crate::aws::{error_text, Backoff};
use crate::time::Millis;

/// Bounds of the retries around each DynamoDB call of a lease operation.
/// Only transient failures are retried (throttling, server errors, the
/// network, an attempt without an answer in `attempt_timeout`); a failed
/// condition never is.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Attempts per call, at least 1.
    pub attempts: u32,
    /// The first backoff; it doubles up to `cap` (jittered).
    pub base: Duration,
    pub cap: Duration,
    pub attempt_timeout: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

/// Whether [`LeaseTable::create_if_absent`] wrote the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Created,
    /// A lease with this key was there already; it was left as it was.
    AlreadyExists,
}

/// What a checkpoint records of shardflow's besides KCL's position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Where the state snapshot matching the checkpoint is.
    pub snapshot: Option<String>,
    /// The shard's watermark at the checkpoint.
    pub watermark: Option<Millis>,
}

/// One worker's handle on the lease table: the table, and who "me" is in
/// the conditions.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    pub(crate) client: Client,
    pub(crate) name: String,
    pub(crate) worker: String,
    pub(crate) address: Option<String>,
    pub(crate) retry: Retry,
    pub(crate) scan_page: Option<i32>,
}

/// A failed call: the service answered with one of the codes the caller
/// handles (a failed condition's error carries the row as it is), or it
/// failed for good.
pub(crate) enum CallError<E> {
    Answer(E),
    Failed(LeaseError),
}

impl LeaseTable {
    /// `worker` names this worker in `leaseOwner` and `checkpointOwner`.
    pub fn new(client: Client, name: impl Into<String>, worker: impl Into<String>) -> LeaseTable {
        LeaseTable {
            client,
            name: name.into(),
            worker: worker.into(),
            address: None,
            retry: Retry::default(),
            scan_page: None,
        }
    }

    /// The API address written with the leases this worker takes and renews.
    pub fn with_address(mut self, address: impl Into<String>) -> LeaseTable {
        self.address = Some(address.into()).filter(|a| !a.is_empty());
        self
    }

    pub fn with_retry(mut self, retry: Retry) -> LeaseTable {
        self.retry = retry;
        self
    }

    /// Items per Scan page of [`LeaseTable::list`] (DynamoDB's 1 MB pages
    /// otherwise), to exercise paging.
    pub fn with_scan_page(mut self, items: i32) -> LeaseTable {
        self.scan_page = Some(items.max(1));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Every lease, by key, with a consistent Scan (KCL's is eventually
    /// consistent; a lease listed here is at least as new as every write
    /// acknowledged before). Rows of other entities are skipped, and so are
    /// lease rows that cannot be read, with a warning (as KCL does), so one
    /// bad row does not stop every worker.
    pub async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        let mut leases = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let request = self
                .client
                .scan()
                .table_name(&self.name)
                .consistent_read(true)
                .set_limit(self.scan_page)
                .set_exclusive_start_key(start.take());
            let page = self
                .call("list", None, &[], || request.clone().send())
                .await
                .map_err(|e| self.permanent(e))?;
            for item in page.items() {
                match Lease::from_item(item) {
                    Ok(Some(lease)) => leases.push(lease),
                    Ok(None) => {}
                    Err(why) => tracing::warn!(
                        table = %self.name,
                        key = ?item.get(LEASE_KEY),
                        "skipping a lease row that cannot be read: {why}"
                    ),
                }
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        leases.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
        Ok(leases)
    }

    /// The lease of `lease_key` (a consistent read); `None` when there is no
    /// lease row with that key.
    pub async fn get(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        let request = self
            .client
            .get_item()
            .table_name(&self.name)
            .key(LEASE_KEY, s(lease_key))
            .consistent_read(true);
        let out = self
            .call("get", Some(lease_key), &[], || request.clone().send())
            .await
            .map_err(|e| self.permanent(e))?;
        match out.item() {
            None => Ok(None),
            Some(item) => Lease::from_item(item).map_err(|why| self.failed("get", lease_key, why)),
        }
    }

    /// Writes `lease` unless a row with its key exists (KCL's
    /// `createLeaseIfNotExists`): shard discovery by several workers at once
    /// creates each lease once.
    pub async fn create_if_absent(&self, lease: &Lease) -> Result<Created, LeaseError> {
        let request = self
            .client
            .put_item()
            .table_name(&self.name)
            .set_item(Some(lease.to_item()))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", LEASE_KEY);
        match self
            .call(
                "create",
                Some(&lease.lease_key),
                &[CONDITION_FAILED],
                || request.clone().send(),
            )
            .await
        {
            Ok(_) => Ok(Created::Created),
            Err(CallError::Answer(PutItemError::ConditionalCheckFailedException(_))) => {
                Ok(Created::AlreadyExists)
            }
            Err(e) => Err(self.permanent(e)),
        }
    }

    /// Bumps the counter of a lease this worker holds, so that others see it
    /// alive. Lost when the counter is not `lease.counter` any more or this
    /// worker does not hold the lease (see [`Lease::actual_owner`]).
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let mut e = Expr::default();
        let cond = format!(
            "{} AND {}",
            e.counter_is(lease.counter),
            e.held_by(&self.worker)
        );
        e.set(LEASE_COUNTER, n(lease.counter + 1));
        if let Some(address) = &self.address {
            e.set(OWNER_ADDRESS, s(address));
        }
        self.update("renew", lease, e, cond, |now| {
            now.counter == lease.counter + 1 && now.actual_owner() == Some(&self.worker)
        })
        .await
    }

    /// Makes this worker the owner, whoever held the lease: conditional on
    /// the counter alone (KCL's `takeLease`), so a lease is taken only as it
    /// was read, expired or unowned by the caller's judgement. A pending
    /// handoff is cancelled; the owner switches count up when the lease
    /// changes hands as KCL counts them.
    pub async fn take(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let mut e = Expr::default();
        let cond = format!("{} AND {}", e.counter_is(lease.counter), e.exists());
        e.set(LEASE_OWNER, s(&self.worker));
        e.set(LEASE_COUNTER, n(lease.counter + 1));
        let switched = lease.owner.as_ref().is_some_and(|o| *o != self.worker)
            || lease.checkpoint_owner.as_deref() == Some(&self.worker);
        if switched {
            e.increment(OWNER_SWITCHES);
        }
        e.remove(CHECKPOINT_OWNER);
        match &self.address {
            Some(address) => e.set(OWNER_ADDRESS, s(address)),
            None => e.remove(OWNER_ADDRESS),
        }
        self.update("take", lease, e, cond, |now| {
            now.counter == lease.counter + 1
                && now.owner.as_deref() == Some(&self.worker)
                && now.checkpoint_owner.is_none()
        })
        .await
    }

    /// Gives the lease up, by its holder or by anyone evicting it (KCL's
    /// `evictLease`): unowned afterwards or, while a handoff is pending,
    /// handed to the worker it was going to. Conditional on the owner
    /// fields read, not on the counter, so the holder's renewals do not
    /// refuse it.
    pub async fn release(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let mut e = Expr::default();
        let cond = format!(
            "{} AND {} AND {}",
            e.field_is(LEASE_OWNER, lease.owner.as_deref()),
            e.field_is(CHECKPOINT_OWNER, lease.checkpoint_owner.as_deref()),
            e.exists()
        );
        let next_owner = if lease.handoff_pending() {
            lease.owner.clone()
        } else {
            e.remove(LEASE_OWNER);
            None
        };
        e.remove(CHECKPOINT_OWNER);
        e.remove(OWNER_ADDRESS);
        e.increment(LEASE_COUNTER);
        self.update("release", lease, e, cond, |now| {
            now.owner == next_owner && now.checkpoint_owner.is_none()
        })
        .await
    }

    /// Records where processing of the shard has got to, with shardflow's
    /// [`Progress`] (an absent field is removed: a snapshot or watermark of
    /// an older checkpoint would not match this one). Conditional like
    /// [`LeaseTable::renew`] (KCL conditions on the counter only, its
    /// renewer and checkpointer sharing one copy): a worker that lost the
    /// lease cannot checkpoint, even if it took it back since. Bumps the
    /// counter, resets the owner switches, clears a prepared checkpoint.
    pub async fn checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &Checkpoint,
        progress: &Progress,
    ) -> Result<Lease, LeaseError> {
        let mut e = Expr::default();
        let cond = format!(
            "{} AND {}",
            e.counter_is(lease.counter),
            e.held_by(&self.worker)
        );
        e.set(LEASE_COUNTER, n(lease.counter + 1));
        e.set(CHECKPOINT, s(checkpoint.sequence_number()));
        e.set(CHECKPOINT_SUB, n(checkpoint.sub_sequence_number()));
        e.set(OWNER_SWITCHES, n(0));
        for name in [
            PENDING_CHECKPOINT,
            PENDING_CHECKPOINT_SUB,
            PENDING_CHECKPOINT_STATE,
        ] {
            e.remove(name);
        }
        match progress.snapshot.as_deref().filter(|p| !p.is_empty()) {
            Some(snapshot) => e.set(SNAPSHOT, s(snapshot)),
            None => e.remove(SNAPSHOT),
        }
        match progress.watermark {
            Some(watermark) => e.set(WATERMARK, n(watermark)),
            None => e.remove(WATERMARK),
        }
        self.update("checkpoint", lease, e, cond, |now| {
            now.counter == lease.counter + 1
                && now.actual_owner() == Some(&self.worker)
                && now.checkpoint == *checkpoint
        })
        .await
    }

    /// Starts a graceful handoff of an owned lease to `to` (KCL's
    /// `initiateGracefulLeaseHandoff`): `leaseOwner` becomes `to` and
    /// `checkpointOwner` the old owner, who goes on holding the lease until
    /// its last checkpoint, then [`LeaseTable::release`]s it to `to`. The
    /// counter is left alone so the holder's renewals go on. Conditional on
    /// the owner read and on no handoff pending.
    pub async fn request_handoff(&self, lease: &Lease, to: &str) -> Result<Lease, LeaseError> {
        let Some(from) = lease.owner.as_deref().filter(|_| !lease.handoff_pending()) else {
            return Err(self.failed(
                "handoff",
                &lease.lease_key,
                "the lease has no owner to hand it off, or a handoff is pending".into(),
            ));
        };
        let mut e = Expr::default();
        let cond = format!(
            "{} AND {} AND {}",
            e.field_is(LEASE_OWNER, Some(from)),
            e.field_is(CHECKPOINT_OWNER, None),
            e.exists()
        );
        e.set(LEASE_OWNER, s(to));
        e.set(CHECKPOINT_OWNER, s(from));
        self.update("handoff", lease, e, cond, |now| {
            now.owner.as_deref() == Some(to) && now.checkpoint_owner.as_deref() == Some(from)
        })
        .await
    }

    /// Deletes the lease (a shard gone from the stream and done with),
    /// conditional on the counter read: a lease someone holds and renews is
    /// not deleted from under them. Deleting a lease already gone succeeds.
    pub async fn delete(&self, lease: &Lease) -> Result<(), LeaseError> {
        let mut e = Expr::default();
        let cond = e.counter_is(lease.counter);
        let request = self
            .client
            .delete_item()
            .table_name(&self.name)
            .key(LEASE_KEY, s(&lease.lease_key))
            .condition_expression(cond)
            .set_expression_attribute_names(Some(e.names))
            .set_expression_attribute_values(Some(e.values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        match self
            .call(
                "delete",
                Some(&lease.lease_key),
                &[CONDITION_FAILED],
                || request.clone().send(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(CallError::Answer(DeleteItemError::ConditionalCheckFailedException(c))) => {
                match c.item().filter(|i| !i.is_empty()) {
                    None => Ok(()),
                    Some(item) => Err(self.lost("delete", lease, Some(item))),
                }
            }
            Err(e) => Err(self.permanent(e)),
        }
    }

    /// One conditional UpdateItem returning the new row. When the condition
    /// fails but the row already shows this write (`applied`: an earlier
    /// attempt whose answer was lost succeeded), it counts as done, as KCL's
    /// renewal does.
    async fn update(
        &self,
        op: &'static str,
        lease: &Lease,
        e: Expr,
        condition: String,
        applied: impl Fn(&Lease) -> bool,
    ) -> Result<Lease, LeaseError> {
        let request = self
            .client
            .update_item()
            .table_name(&self.name)
            .key(LEASE_KEY, s(&lease.lease_key))
            .update_expression(e.update_expression())
            .condition_expression(condition)
            .set_expression_attribute_names(Some(e.names))
            .set_expression_attribute_values(Some(e.values))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let key = lease.lease_key.as_str();
        let now = match self
            .call(op, Some(key), &[CONDITION_FAILED], || {
                request.clone().send()
            })
            .await
        {
            Ok(out) => out.attributes().cloned().unwrap_or_default(),
            Err(CallError::Answer(UpdateItemError::ConditionalCheckFailedException(c))) => {
                let row = c.item().filter(|i| !i.is_empty());
                match row.map(Lease::from_item) {
                    Some(Ok(Some(now))) if applied(&now) => return Ok(now),
                    _ => return Err(self.lost(op, lease, row)),
                }
            }
            Err(e) => return Err(self.permanent(e)),
        };
        match Lease::from_item(&now) {
            Ok(Some(lease)) => Ok(lease),
            Ok(None) => Err(self.failed(op, key, "the row is not a lease".into())),
            Err(why) => Err(self.failed(op, key, why)),
        }
    }

    /// Sends with retries of transient failures, within [`Retry`]'s bounds;
    /// the error codes in `answers` come back as [`CallError::Answer`].
    pub(crate) async fn call<T, E, R, F, Fut>(
        &self,
        op: &'static str,
        key: Option<&str>,
        answers: &[&str],
        mut send: F,
    ) -> Result<T, CallError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let attempts = self.retry.attempts.max(1);
        let mut backoff = Backoff::new(self.retry.base, self.retry.cap);
        let mut attempt = 1;
        loop {
            let why = match tokio::time::timeout(self.retry.attempt_timeout, send()).await {
                Ok(Ok(out)) => return Ok(out),
                Ok(Err(SdkError::ServiceError(e)))
                    if e.err().code().is_some_and(|c| answers.contains(&c)) =>
                {
                    return Err(CallError::Answer(e.into_err()))
                }
                Ok(Err(e)) => match verdict(&e) {
                    Verdict::Permanent => {
                        return Err(CallError::Failed(self.failed_at(op, key, error_text(&e))))
                    }
                    Verdict::Transient => error_text(&e),
                },
                Err(_) => format!("no answer within {:?}", self.retry.attempt_timeout),
            };
            if attempt >= attempts {
                let why = format!("{why} (after {attempts} attempts)");
                return Err(CallError::Failed(self.failed_at(op, key, why)));
            }
            tracing::debug!(table = %self.name, op, attempt, "retrying: {why}");
            tokio::time::sleep(backoff.next_delay()).await;
            attempt += 1;
        }
    }

    /// A call's error, where the operation handles no answer (or not this
    /// one).
    pub(crate) fn permanent<E: std::error::Error>(&self, e: CallError<E>) -> LeaseError {
        match e {
            CallError::Failed(e) => e,
            CallError::Answer(e) => self.failed_at("call", None, e.to_string()),
        }
    }

    fn lost(&self, op: &'static str, lease: &Lease, row: Option<&Item>) -> LeaseError {
        LeaseError::Lost {
            table: self.name.clone(),
            lease_key: lease.lease_key.clone(),
            op,
            current: row
                .and_then(|r| Lease::from_item(r).ok().flatten())
                .map(Box::new),
        }
    }

    fn failed(&self, op: &'static str, key: &str, message: String) -> LeaseError {
        self.failed_at(op, Some(key), message)
    }

    pub(crate) fn failed_at(
        &self,
        op: &'static str,
        key: Option<&str>,
        message: String,
    ) -> LeaseError {
        LeaseError::Failed {
            table: self.name.clone(),
            op,
            key: key.map(str::to_owned),
            message,
        }
    }
}
