// Svelte stores of natsgate/svelte (docs/guide.md). Svelte's store contract is `subscribe(run)
// → unsubscribe`, which the stores of stores.js keep already, so nothing is imported from
// Svelte:
//
//   <script>
//     import { kv } from "natsgate/svelte";
//     export let client, uid;
//     $: todos = kv(client, "todos", { pattern: `user.${uid}.>` });
//   </script>
//   {#each [...$todos.values] as [key, t] (key)}<li>{t.title}</li>{/each}
//
// `$todos` subscribes when the component mounts and unsubscribes when it is destroyed (or
// when `todos` is replaced): the last unsubscribe closes the client's subscription (`unsub`).
// One store shared by several components holds one subscription.

export {
  connectionStore as connection,
  kvStore as kv,
  readable,
  streamStore as stream,
  subjectStore as subject,
} from "./stores.js";
