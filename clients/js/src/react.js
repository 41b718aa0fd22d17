// The React hooks of natsgate/react (docs/guide.md). React is passed in, not imported, so this file
// needs no bundler and no particular React build:
//
//   import * as React from "react";
//   import { bindReact } from "natsgate/react";
//   export const { useKv, useStream, useSubject, useConnection } = bindReact(React);
//
//   function Todos({ client, uid }) {
//     const { state, values } = useKv(client, "todos", { pattern: `user.${uid}.>` });
//     if (state !== "synced") return <p>Loading…</p>;
//     return <ul>{[...values].map(([key, t]) => <li key={key}>{t.title}</li>)}</ul>;
//   }
//
// Each hook reads one store of stores.js through `useSyncExternalStore`: the client's
// subscription opens when the component mounts and is closed (`unsub`) when it unmounts,
// or when the client, the target or an option changes. Options are compared by value;
// functions among them (`decode`, `onMessage`) are taken from the render that opened it.

import { connectionStore, kvStore, streamStore, subjectStore } from "./stores.js";

/** The options as a dependency: by value, functions left out. @param {object | undefined} opts */
function optionsKey(opts) {
  return JSON.stringify(opts ?? {}, (_key, value) => (typeof value === "function" ? undefined : value));
}

/**
 * @param {{useMemo: Function, useSyncExternalStore: Function}} React
 */
export function bindReact({ useMemo, useSyncExternalStore }) {
  /**
   * @template T
   * @param {() => import("./stores.js").Readable<T>} make
   * @param {unknown[]} deps
   * @returns {T}
   */
  const useStore = (make, deps) => {
    const store = useMemo(make, deps);
    return useSyncExternalStore(store.subscribe, store.get);
  };
  return {
    /**
     * @param {import("./index.js").SyncClient} client
     * @param {string} bucket
     * @param {import("./index.js").KvOptions<any>} [opts]
     * @returns {import("./stores.js").KvSnapshot}
     */
    useKv: (client, bucket, opts) =>
      useStore(() => kvStore(client, bucket, opts), [client, bucket, optionsKey(opts)]),
    /**
     * @param {import("./index.js").SyncClient} client
     * @param {string} name
     * @param {import("./index.js").StreamSubscriptionOptions<any> & {limit?: number}} [opts]
     * @returns {import("./stores.js").StreamSnapshot}
     */
    useStream: (client, name, opts) =>
      useStore(() => streamStore(client, name, opts), [client, name, optionsKey(opts)]),
    /**
     * @param {import("./index.js").SyncClient} client
     * @param {string} subject
     * @param {{limit?: number}} [opts]
     * @returns {import("./stores.js").SubjectSnapshot}
     */
    useSubject: (client, subject, opts) =>
      useStore(() => subjectStore(client, subject, opts), [client, subject, optionsKey(opts)]),
    /**
     * @param {import("./index.js").SyncClient} client
     * @returns {import("./stores.js").ConnectionSnapshot}
     */
    useConnection: (client) => useStore(() => connectionStore(client), [client]),
  };
}
