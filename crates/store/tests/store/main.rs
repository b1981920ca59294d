//! The store conformance suite: every case runs against a real SQLite file
//! and a real PostgreSQL database (its own, created and dropped per test).
//!
//! PostgreSQL comes from `STACYVM_TEST_POSTGRES_URL` (a server URL; each test
//! creates `stacyvm_test_<random>` on it) or, when that is unset, from
//! `scripts/start-postgres.sh`. A PostgreSQL that cannot be had fails the
//! tests rather than skipping them.

mod audit;
mod fixtures;
mod harness;
mod keys;
mod lifecycle;
mod quotas;
mod sandboxes;
mod templates;
mod tenants;
mod volumes;
mod workers;

/// Generates `sqlite::CASE` and `postgres::CASE` tests running
/// `MODULE::CASE(&TestDb)` against a fresh database of each backend.
macro_rules! conformance {
    ($($module:ident :: $case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() -> anyhow::Result<()> {
                    let db = crate::harness::TestDb::sqlite().await?;
                    crate::$module::$case(&db).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() -> anyhow::Result<()> {
                    let db = crate::harness::TestDb::postgres().await?;
                    crate::$module::$case(&db).await
                }
            )*
        }
    };
}

conformance! {
    lifecycle::kind_and_ping,
    lifecycle::reopen_keeps_everything,
    lifecycle::migrations_are_recorded_once,
    lifecycle::concurrent_opens_migrate_once,
    lifecycle::newer_schema_is_refused,
    lifecycle::a_first_schema_database_keeps_its_data_on_upgrade,
    tenants::tenant_create_get_list,
    tenants::duplicate_tenant_name_is_a_conflict,
    tenants::bad_cursor_is_invalid_request,
    quotas::quota_defaults_set_and_replace,
    quotas::quota_of_missing_tenant_is_not_found,
    quotas::concurrent_creates_never_overshoot_max_sandboxes,
    quotas::cpu_and_memory_limits,
    quotas::terminal_sandboxes_free_quota,
    quotas::quota_messages_name_limit_and_numbers,
    quotas::an_empty_provider_list_is_not_unset,
    keys::key_create_lookup_list_revoke,
    keys::key_conflicts_and_missing_tenant,
    keys::key_list_pages,
    keys::key_list_of_every_tenant_pages_and_checks_its_cursor,
    sandboxes::sandbox_round_trips_every_field,
    sandboxes::sandbox_create_for_missing_tenant_is_not_found,
    sandboxes::sandbox_list_filters,
    sandboxes::sandbox_list_pages_over_more_than_limit,
    sandboxes::sandbox_list_pages_newest_first,
    sandboxes::sandbox_list_pages_under_every_filter,
    sandboxes::sandbox_update_checks_fencing_token,
    sandboxes::sandbox_update_from_writes_only_from_the_state_read,
    sandboxes::concurrent_update_from_lets_exactly_one_writer_through,
    sandboxes::sandbox_claim_increments_token,
    sandboxes::lease_renew_extends_live_sandboxes_of_the_worker,
    sandboxes::live_expired_and_counts,
    sandboxes::idempotency_keys,
    sandboxes::concurrent_creates_with_one_idempotency_key_make_one_sandbox,
    audit::audit_round_trips_and_filters,
    audit::audit_pages_in_append_order,
    audit::audit_events_refuse_update_and_delete,
    audit::concurrent_appends_all_land_and_a_duplicate_fails_alone,
    workers::worker_upsert_get_list_set_state,
    workers::worker_tokens_are_stored_by_hash_and_revoked_once,
    workers::leader_leases_pass_on_only_when_they_run_out,
    workers::placement_checks_state_and_every_capacity,
    workers::concurrent_placements_never_overfill_a_worker,
    workers::heartbeats_renew_leases_and_bring_workers_back,
    workers::lapsed_leases_lose_sandboxes_and_fence_the_old_holder,
    volumes::volume_names_are_unique_per_tenant,
    volumes::a_mounted_volume_is_deleted_only_after_its_sandbox,
    volumes::volume_quotas_count_volumes_and_their_sizes,
    templates::template_versions_are_numbered_per_tenant_and_name,
    templates::build_logs_and_finishing_only_while_building,
    templates::deleted_templates_keep_their_numbers_until_purged,
    templates::max_templates_counts_names_not_versions,
}
