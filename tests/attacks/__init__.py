"""The attack suite: one test per attack (python-tuf's ``test_updater_*attacks*`` habit, Uptane's threat model).

An agent-side case asserts, through ``harness.assert_attack_refused``, the
exact error the agent reports or logs, that its trusted state and active
model are byte-identical afterwards, and that it still installs a fresh valid
release next. A server-side case asserts, through ``ingest.assert_ingest_refused``,
that ingest logs the error, stores nothing and keeps going. Every attack, and
what stops it (``test_catalogue.py`` keeps this list and the tests in step):

test_updater_metadata_attacks.py: signed metadata (``agent/trust.py``, ``shared/signing.py``)

- ``test_unknown_release_key``: a manifest signed by a key the device never pinned; only pinned keys count.
- ``test_unknown_director_key``: the same for the directive.
- ``test_release_signed_with_the_director_key``: the online key alone cannot sign a release (roles are separate).
- ``test_directive_signed_with_the_release_key``: nor can the release key direct a device.
- ``test_model_file_swapped_after_signing``: the signature covers the canonical form of every field.
- ``test_manifest_without_signatures``: no signature, no trust (fail closed).
- ``test_directive_for_another_device``: the directive names its device; the agent checks it is its own.
- ``test_release_for_another_profile``: the manifest names its profile (Uptane's hardware identifier).
- ``test_replayed_directive_with_a_lower_sequence``: the directive sequence never goes back.
- ``test_replayed_directive_with_the_same_sequence_for_another_deployment``: a used sequence names one deployment.
- ``test_rollback_to_an_older_genuine_release``: the release counter never goes back, whatever the director says.
- ``test_replayed_old_desired_state``: both counters; the current one's retained copy is ignored quietly.
- ``test_forgery_replayed_on_every_reconnect``: a rejection is reported once per distinct message.
- ``test_expired_manifest``: freeze; metadata carries an expiry the agent checks against its clock.
- ``test_expired_directive``: freeze, for the directive.
- ``test_directive_paired_with_another_genuine_manifest``: mix-and-match; the directive pins the manifest's digest.
- ``test_forgery_evicting_a_pending_directive``: only a verified directive can take the pending place.

test_updater_canonical_json_attacks.py: one text, one document (``shared/canonical.py``)

- ``test_duplicate_key``: refused by the parser, so no two readers see two documents behind one signature.
- ``test_duplicate_key_behind_a_unicode_escape``: keys are compared decoded.
- ``test_non_canonical_number``: 2.0 re-encodes as 2.0, which nobody signed.
- ``test_exponent_form_of_an_integer``: 2e0 likewise.
- ``test_nan``: NaN and the infinities are refused by the parser.
- ``test_infinity``: likewise.
- ``test_a_number_that_overflows_to_infinity``: 1e999 reads as inf; nothing without a canonical form is accepted.
- ``test_unicode_escape_with_no_canonical_form``: a lone surrogate has no UTF-8 form: refused likewise.
- ``test_signature_over_a_non_canonical_encoding``: signatures are checked over the canonical form only.
- ``test_a_bad_signature_ahead_of_a_good_one``: every signature is tried; a bad one neither passes nor blocks.
- ``test_duplicated_signature``: a valid signature over other bytes is no signature, however often listed.

test_updater_chunk_attacks.py: artifact chunks (``agent/download.py``)

- ``test_chunk_bytes_altered_in_flight``: each chunk's size and sha256 are signed; a bad copy is dropped, asked
  for again, and the download fails once only bad copies came for three request intervals.
- ``test_endless_data``: nothing past the signed size is written; an over-long chunk is a bad copy.
- ``test_chunk_index_out_of_range``: an index the manifest does not list is dropped.
- ``test_negative_chunk_index``: the same check, behind the topic grammar.
- ``test_chunk_index_outside_the_topic_grammar``: a chunk topic's index is a plain decimal below 10^9.
- ``test_chunk_for_an_artifact_nobody_asked_for``: a chunk of a file no download wants is ignored.
- ``test_chunk_while_idle``: likewise, with no download at all.
- ``test_corrupt_copy_racing_every_genuine_chunk``: a bad copy costs a re-request, never the download.
- ``test_corrupt_copies_to_abort_a_download``: a round that brought a good chunk resets the count of bad rounds.
- ``test_corrupt_copies_while_the_server_is_away``: bad copies alone end a download only after three intervals.

test_agent_payload_attacks.py: what the agent decodes (``shared/messages.py`` ``decode_payload``)

- ``test_oversized_payload_at_the_agent``: a size limit per topic, checked before parsing (desired, cmd, ack).
- ``test_deeply_nested_payload_at_the_agent``: a nesting limit of 64 levels, checked before decoding.
- ``test_deeply_nested_signed_document``: likewise, inside a signed document (it used to crash the rejection).
- ``test_oversized_chunk``: a chunk of the wrong size is a bad copy, dropped unhashed.

test_transport_attacks.py: the broker (``shared/mqtt.py``, a real Mosquitto)

- ``test_oversized_message_for_the_agent_at_the_broker``: the agent's Maximum Packet Size; the broker drops it.
- ``test_oversized_message_for_the_server_at_the_broker``: the server's likewise.

test_broker_attacks.py: the broker as ``edgefleet init`` and ``edgefleet broker`` set it up (real Mosquitto, TLS)

- ``test_the_registered_config_connects_over_tls_with_its_own_identity``: the control: a device's own config works.
- ``test_an_anonymous_client_is_refused``: anonymous access is off.
- ``test_a_wrong_password_is_refused``: a password per device, PBKDF2-hashed in the broker's password file.
- ``test_plain_mqtt_to_the_tls_listener_gets_nowhere``: the only listener speaks TLS.
- ``test_a_client_that_does_not_pin_the_fleet_ca_does_not_trust_the_broker``: the broker's certificate chains
  to the fleet's private CA only, which devices pin.
- ``test_the_broker_certificate_names_only_the_hosts_init_was_given``: hostname checks against init's hosts.
- ``test_a_device_cannot_publish_on_another_devices_topic``: the ACL binds every report topic (state,
  availability, events, telemetry, want) to the publisher's own username.
- ``test_a_device_cannot_publish_on_what_only_the_server_sends``: desired, cmd, chunks and root are read-only.
- ``test_a_device_cannot_read_another_devices_desired_state_commands_or_acks``: reads are bound to the
  username too; its own arrive.
- ``test_a_device_cannot_read_another_devices_reports``: devices read no report topic at all.
- ``test_artifact_chunks_and_the_root_reach_every_device``: the control for what every device may read.
- ``test_a_device_cannot_take_over_another_devices_session_by_its_client_id``: the broker uses the username as
  client id, so a session is bound to its identity.
- ``test_a_removed_device_is_disconnected_at_once_and_cannot_connect_again``: removal rewrites the password file
  and the broker re-reads it, dropping the live connection.

test_broker_mtls_attacks.py: client certificates (``edgefleet init --client-certificates``)

- ``test_a_device_with_its_certificate_connects``: the control: the config register writes carries a certificate.
- ``test_the_server_connects_with_its_own_certificate``: the server's certificate is a client one too.
- ``test_the_right_password_without_a_certificate_gets_no_session``: the TLS handshake needs a certificate.
- ``test_a_certificate_from_another_ca_gets_no_session``: only the fleet CA's certificates count.

test_root_attacks.py: the root of trust on ``ef/v1/root`` (``agent/root.py``, ``shared/root.py``)

- ``test_a_malicious_root_rotation``: a new root must be signed by a threshold of the trusted root's root keys
  and of its own, be exactly one version newer, and not be expired; not chained, lower, skipped, expired and
  below-threshold chains are refused and change nothing.

test_server_ingest_attacks.py: what the server decodes (``server/service.py`` ``handle_batch``)

- ``test_oversized_payload_at_the_server``: the size limit, on state, availability, events, telemetry and want.
- ``test_deeply_nested_payload_at_the_server``: the nesting limit, on the same topics.

test_updater_hostile_model_attacks.py: genuinely signed, hostile models (``shared/trial.py``, the real child)

- ``test_truncated_model``: the trial child loads the model; it cannot, the deployment rolls back.
- ``test_random_bytes_as_a_model``: likewise.
- ``test_huge_tensor_allocation``: a tensor larger than the trial's memory limit is refused before allocation.
- ``test_unknown_custom_op``: the interpreter cannot prepare it: a load error, rolled back.
- ``test_model_that_hangs``: the trial's time limit kills the child; the agent's loop only polls it.
"""
