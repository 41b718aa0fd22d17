// The Vue composables of natsgate/vue (docs/guide.md). Vue is passed in, not imported, so this
// file needs no bundler:
//
//   import { shallowRef, onScopeDispose } from "vue";
//   import { bindVue } from "natsgate/vue";
//   export const { useKv, useStream, useSubject, useConnection } = bindVue({ shallowRef, onScopeDispose });
//
//   // in <script setup>:
//   const todos = useKv(client, "todos", { pattern: `user.${uid}.>` });
//   // template: <li v-for="[key, t] in todos.values" :key="key">{{ t.title }}</li>
//
// Each composable returns a shallow ref holding the latest snapshot of one store of
// stores.js (a new object at each change, so the shallow ref triggers). Called in `setup`,
// the client's subscription is closed (`unsub`) when the component unmounts (its effect
// scope is disposed); in any other effect scope, when that scope is stopped. The arguments
// are read once: to follow a changing bucket or filter, give the component a `:key`.

import { connectionStore, kvStore, streamStore, subjectStore } from "./stores.js";

/**
 * @param {{shallowRef: Function, onScopeDispose: Function}} Vue
 */
export function bindVue({ shallowRef, onScopeDispose }) {
  /**
   * @template T
   * @param {import("./stores.js").Readable<T>} store
   * @returns {{value: T}}
   */
  const useStore = (store) => {
    const ref = shallowRef(store.get());
    /** @type {(() => void) | null} */
    let stop = null;
    // Registered before subscribing: outside any scope nothing is opened to leak.
    onScopeDispose(() => stop?.());
    stop = store.subscribe((/** @type {T} */ value) => {
      ref.value = value;
    });
    return ref;
  };
  return {
    /**
     * @param {import("./index.js").SyncClient} client
     * @param {string} bucket
     * @param {import("./index.js").KvOptions<any>} [opts]
     * @returns {{value: import("./stores.js").KvSnapshot}}
     */
    useKv: (client, bucket, opts) => useStore(kvStore(client, bucket, opts)),
    /**
     * @param {import("./index.js").SyncClient} client
     * @param {string} name
     * @param {import("./index.js").StreamSubscriptionOptions<any> & {limit?: number}} [opts]
     * @returns {{value: import("./stores.js").StreamSnapshot}}
     */
    useStream: (client, name, opts) => useStore(streamStore(client, name, opts)),
    /**
     * @param {import("./index.js").SyncClient} client
     * @param {string} subject
     * @param {{limit?: number}} [opts]
     * @returns {{value: import("./stores.js").SubjectSnapshot}}
     */
    useSubject: (client, subject, opts) => useStore(subjectStore(client, subject, opts)),
    /**
     * @param {import("./index.js").SyncClient} client
     * @returns {{value: import("./stores.js").ConnectionSnapshot}}
     */
    useConnection: (client) => useStore(connectionStore(client)),
  };
}
