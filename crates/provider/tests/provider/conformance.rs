//! The provider conformance suite (`stacyvm_provider::conformance`, where
//! every case is written once) run against every provider (`mod docker`,
//! `mod proot`, `mod namespaces`, and the reference plugin in `mod plugin`
//! below), on the real runtime.

/// Generates one `#[tokio::test]` per case for the provider built by `$ctor`
/// (an `async fn(&TestEnv) -> anyhow::Result<DynProvider>`, which fails
/// the test when its runtime is absent from this host).
macro_rules! conformance {
    ($ctor:path) => {
        conformance!(@cases $ctor;
            spawn_and_exit_code,
            stdout_and_stderr_are_kept_apart,
            stdin_is_delivered,
            env_and_cwd_are_applied,
            timeout_kills_the_command_and_its_children,
            stream_delivers_the_first_chunk_before_the_end,
            binary_file_round_trips_byte_identical,
            file_operations_follow_the_api,
            paths_and_symlinks_never_reach_the_host,
            destroy_is_idempotent_and_leaves_nothing,
            unknown_sandboxes_and_images_are_reported,
        );
    };
    (@cases $ctor:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() -> anyhow::Result<()> {
                let env = crate::support::TestEnv::new().await?;
                let provider = $ctor(&env).await?;
                let data_dir = env.data_dir.clone();
                let h = stacyvm_provider::conformance::Harness::new(
                    provider,
                    &data_dir,
                    crate::support::IMAGE,
                )
                .keeping(env);
                stacyvm_provider::conformance::$case(&h).await
            }
        )*

        /// The list above is the library's: no case is left out.
        #[test]
        fn every_case_is_run() {
            let here = [$(stringify!($case)),*];
            let all: Vec<&str> = stacyvm_provider::conformance::CASES
                .iter()
                .map(|(name, _)| *name)
                .collect();
            assert_eq!(here.as_slice(), all.as_slice());
        }
    };
}

mod docker {
    conformance!(crate::support::docker_provider);
}

mod proot {
    conformance!(crate::support::proot_provider);
}

mod namespaces {
    conformance!(crate::support::namespaces_provider);
}

mod plugin {
    conformance!(crate::support::plugin_provider);
}

mod qemu {
    conformance!(crate::support::qemu_provider);
}
